"""QLoRA: LoRA over a 4-bit/8-bit bitsandbytes base, prepared for k-bit training.

The quantized base comes from `models.load_model` (BitsAndBytesConfig); here we only apply
peft's `prepare_model_for_kbit_training` (norms in fp32, input grads, optional gradient
checkpointing) and then the same LoRA build as `lora`.
"""

from __future__ import annotations

from typing import Any

from peftkit.adapters import lora
from peftkit.adapters.registry import AdapterMethod, register
from peftkit.config.schema import QLoraAdapterConfig, QuantizationConfig

DEFAULT_QUANTIZATION = QuantizationConfig(bits=4, quant_type="nf4", double_quant=True)


def prepare(model: Any, gradient_checkpointing: bool) -> Any:
    """Cast norms to fp32 and (optionally) enable gradient checkpointing, as QLoRA prescribes."""
    import warnings

    from peft import prepare_model_for_kbit_training

    with warnings.catch_warnings():  # peft calls transformers' renamed `gradient_checkpointing_enable`: not the user's to fix
        warnings.filterwarnings("ignore", message=r".*gradient_checkpointing_enable.*deprecated", category=FutureWarning)
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )


def build(model: Any, cfg: QLoraAdapterConfig, *, task: str = "causal_lm", quantized: bool = True, calibration: Any = None) -> Any:
    """A `qlora` recipe always loads a quantized base (its implied nf4 block, or its own)."""
    return lora.build(model, cfg, task=task, quantized=True, calibration=calibration)


METHOD = register(
    AdapterMethod(name="qlora", config_class=QLoraAdapterConfig, build=build, check=lora.check, quantization=True, save=lora.save,
                  trainer_extras=lora.trainer_extras)
)
