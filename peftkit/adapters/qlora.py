"""QLoRA: LoRA over a 4-bit/8-bit bitsandbytes base, prepared for k-bit training."""

from __future__ import annotations

from typing import Any

from peftkit.config.schema import QuantizationConfig

DEFAULT_QUANTIZATION = QuantizationConfig(bits=4, quant_type="nf4", double_quant=True)


def prepare(model: Any, gradient_checkpointing: bool) -> Any:
    """Cast norms to fp32 and (optionally) enable gradient checkpointing, as QLoRA prescribes."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
