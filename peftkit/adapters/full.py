"""Full fine-tuning: no adapter, every parameter trains. The quality reference for benchmarks.

A full run has no adapter to save: the whole model goes to RUN_DIR/model (safetensors,
`save_pretrained` layout) and `peftkit.runs.load_run` loads it from there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from peftkit.adapters.registry import AdapterMethod, register
from peftkit.config.schema import FullAdapterConfig
from peftkit.errors import ConfigError

MODEL_DIR = "model"
"""Where runs without a peft adapter keep their trained weights, inside the run directory."""
SAVE_DTYPE_ATTR = "peftkit_save_dtype"
"""Set on a model whose trained weights were kept in float32 for bf16 mixed precision: the dtype to save it in."""


def check(model: torch.nn.Module, cfg: FullAdapterConfig, task: str = "causal_lm") -> list[str]:
    return []


def build(model: Any, cfg: FullAdapterConfig, *, task: str = "causal_lm", quantized: bool = False, calibration: Any = None) -> Any:
    if quantized:
        raise ConfigError("adapter.method: full cannot train a 4/8-bit quantized base; remove the `quantization:` block")
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def save_model(model: Any, directory: Path) -> None:
    """The whole model in the standard `save_pretrained` layout (safetensors shards, config). A model trained with
    float32 copies of its bf16 weights (adapters.keep_trained_weights_in_float32) is saved in bf16, the recipe's dtype,
    which its config then names: saved as it is, it mixed bf16 and float32 tensors under a config naming one."""
    dtype = getattr(model, SAVE_DTYPE_ATTR, None)
    if dtype is None:
        model.save_pretrained(str(directory))
        return
    state = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in model.state_dict().items()}
    model.save_pretrained(str(directory), state_dict=state)
    config_path = Path(directory) / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["dtype"] = str(dtype).removeprefix("torch.")  # save_pretrained names its first parameter's
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


METHOD = register(
    AdapterMethod(name="full", config_class=FullAdapterConfig, build=build, check=check, uses_peft=False, save=save_model)
)
