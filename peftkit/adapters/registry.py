"""The adapter registry: method name -> how to check, build and save it.

Each method module (lora.py, prefix.py, ...) registers one `AdapterMethod` at import time;
`peftkit.adapters` imports them all. Validation and training only ever go through here, so a
new method is one new module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TASKS = ("causal_lm", "sequence_classification")
PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS"}

Check = Callable[[torch.nn.Module, Any, str], list[str]]
Build = Callable[..., Any]


@dataclass
class TrainerExtras:
    """What a method adds to the Trainer: callbacks and its own optimizer (None: the Trainer's)."""

    callbacks: list[Any] = field(default_factory=list)
    """Put before the metrics callback: they add keys to the log records."""
    optimizer: torch.optim.Optimizer | None = None


def trainer_optimizer_class(args: Any, model: Any) -> tuple[type, dict[str, Any]]:
    """The optimizer class and settings the Trainer would use (`args.optim`, betas, eps...), without the
    learning rate and weight decay, which a method's own parameter groups set."""
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return optimizer_cls, {k: v for k, v in kwargs.items() if k not in {"lr", "weight_decay"}}


def decayed_parameter_names(model: Any) -> set[str]:
    """The parameters weight decay applies to: the Trainer's choice (no biases, no norms), less DoRA's magnitude
    vectors, which hold the base weights' column norms: decay pulled them towards 0, shrinking every adapted layer's
    output (about 1 % per 100 steps at lr 1e-3 with weight_decay 0.1) even where nothing was learnt."""
    from transformers import Trainer

    names = Trainer.get_decay_parameter_names(None, model)  # type: ignore[arg-type]
    return {name for name in names if "lora_magnitude_vector" not in name}


@dataclass(frozen=True)
class AdapterMethod:
    name: str
    config_class: type
    build: Build
    """(model, cfg, *, task, quantized, calibration) -> model ready to train."""
    check: Check
    """(model skeleton, cfg, task) -> problems; runs on a meta-device copy before weights load."""
    uses_peft: bool = True
    """False: the trained model is saved whole (RUN_DIR/model) instead of as an adapter."""
    quantization: bool = False
    """Whether the method can train over a 4/8-bit base."""
    tasks: tuple[str, ...] = TASKS
    trainer_extras: Callable[..., Any] | None = None
    """(model, cfg, args) -> TrainerExtras (callbacks, optimizer); for methods that need them."""
    save: Callable[[Any, Path], None] | None = None
    """Write the trained weights into a directory (default: peft's `save_pretrained`, safetensors)."""


REGISTRY: dict[str, AdapterMethod] = {}


def register(method: AdapterMethod) -> AdapterMethod:
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> AdapterMethod:
    try:
        return REGISTRY[name]
    except KeyError:
        from peftkit.errors import ConfigError

        raise ConfigError(f"`adapter.method` = {name!r} is not an adapter method; choose one of: {', '.join(REGISTRY)}") from None
