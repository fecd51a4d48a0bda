"""Full fine-tuning: no adapter, every parameter trains. The quality reference for benchmarks.

A full run has no adapter to save: the whole model goes to RUN_DIR/model (safetensors,
`save_pretrained` layout) and `peftkit.runs.load_run` loads it from there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from peftkit.adapters.registry import AdapterMethod, register
from peftkit.config.schema import FullAdapterConfig
from peftkit.errors import ConfigError

MODEL_DIR = "model"
"""Where runs without a peft adapter keep their trained weights, inside the run directory."""


def check(model: torch.nn.Module, cfg: FullAdapterConfig, task: str = "causal_lm") -> list[str]:
    return []


def build(model: Any, cfg: FullAdapterConfig, *, task: str = "causal_lm", quantized: bool = False, calibration: Any = None) -> Any:
    if quantized:
        raise ConfigError("adapter.method: full cannot train a 4/8-bit quantized base; remove the `quantization:` block")
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def save_model(model: Any, directory: Path) -> None:
    """The whole model in the standard `save_pretrained` layout (safetensors shards, config)."""
    model.save_pretrained(str(directory))


METHOD = register(
    AdapterMethod(name="full", config_class=FullAdapterConfig, build=build, check=check, uses_peft=False, save=save_model)
)
