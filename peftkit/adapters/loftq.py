"""LoftQ initialisation for LoRA over a bitsandbytes 4/8-bit base, on any device.

QLoRA starts from the quantized weights Q(W) with B = 0, so training first has to win back the
quantization error. LoftQ (Li et al., 2023) starts the adapter at the best rank-r approximation
of that error instead: `scaling * B @ A ~= W - Q(W)`. This is the one-pass, on-the-fly variant of
peft's `replace_lora_weights_loftq` (which reads the full-precision weights from the model's
safetensors files), written here because peft's version runs on CUDA/XPU only and ignores the
LoRA scaling. The adapter then carries that correction: merge it into the dequantized base
(`peftkit merge`'s default for QLoRA runs), not into the original full-precision weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from peftkit.errors import ConfigError
from peftkit.models.safetensors_files import SafetensorsWeights

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."


def local_model_dir(name: str, revision: str | None = None) -> Path:
    """A model directory as given, or a hub id's snapshot already in the local hub cache (loaded from there), at
    `revision`: the commit the quantized base loaded, not whatever `main` the cache also holds."""
    if Path(name).is_dir():
        return Path(name)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=revision, local_files_only=True,
                                      allow_patterns=["*.safetensors", "*.json"]))
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
        raise ConfigError(f"adapter.init: loftq needs the full-precision weights of {name!r} on disk ({exc})") from None


def low_rank_factors(residual: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rank x in), B (out x rank) with `scaling * B @ A` the best rank-`rank` approximation of `residual`."""
    if min(residual.shape) <= 4 * rank:
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    else:  # randomized SVD: exact enough for the top singular values and far cheaper on large matrices
        u, s, v = torch.svd_lowrank(residual, q=rank + 10, niter=4)
        vh = v.T
    root = (s[:rank] / scaling).sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


@torch.no_grad()
def initialise(peft_model: Any, model_dir: str | Path, adapter_name: str = "default", revision: str | None = None) -> int:
    """Set every bitsandbytes LoRA layer's A/B from the quantization error; returns how many were set."""
    from peft.utils.integrations import dequantize_module_weight

    source = local_model_dir(str(model_dir), revision)
    weights = SafetensorsWeights(source)
    if not weights.files:
        raise ConfigError(
            f"adapter.init: loftq reads the full-precision weights from safetensors files, and {source} has none; "
            "use a local model directory or hub model with model.safetensors, or init: default"
        )
    done = 0
    for name, module in peft_model.named_modules():
        if not (hasattr(module, "lora_A") and adapter_name in getattr(module, "lora_A", {})):
            continue
        base = module.get_base_layer()
        if type(base.weight).__name__ not in ("Params4bit", "Int8Params"):
            continue
        original = weights.get(name.removeprefix(PEFT_PREFIX) + ".weight")
        if original is None:
            raise ConfigError(f"adapter.init: loftq: {model_dir} has no weight for {name}; is it the model that was quantized?")
        packed = base.weight
        quantized = dequantize_module_weight(base).float()
        base.weight = packed  # on CPU peft re-assigns an 8-bit weight without its scales (SCB), breaking the layer
        residual = original.to(device=quantized.device, dtype=torch.float32) - quantized
        lora_a, lora_b = low_rank_factors(residual, module.r[adapter_name], module.scaling[adapter_name])
        module.lora_A[adapter_name].weight.copy_(lora_a)
        module.lora_B[adapter_name].weight.copy_(lora_b)
        done += 1
    if not done:
        raise ConfigError("adapter.init: loftq needs a 4-bit or 8-bit base (a quantization block or method: qlora)")
    log.info("LoftQ: initialised %d LoRA layers from the quantization error", done)
    return done
