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
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def keep_trainable_cpu_layout(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 converts a Linear4bit weight to a packed layout
    on its first forward without gradients (generation, evaluation) and keeps it: later training
    forwards then run that kernel, which is bf16-precision and passes no gradient to its input,
    so LoRA layers below it silently get wrong gradients. Measured on a 128->64 nf4 layer: output
    off by 6e-3 and input grad None after one `inference_mode` call. Returns the layers changed.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def build(model: Any, cfg: QLoraAdapterConfig, *, task: str = "causal_lm", quantized: bool = True, calibration: Any = None) -> Any:
    """A `qlora` recipe always loads a quantized base (its implied nf4 block, or its own)."""
    return lora.build(model, cfg, task=task, quantized=True, calibration=calibration)


METHOD = register(
    AdapterMethod(name="qlora", config_class=QLoraAdapterConfig, build=build, check=lora.check, quantization=True, save=lora.save)
)
