"""LoRA (with DoRA / rsLoRA variants): the recipe's adapter block as a `peft.LoraConfig`."""

from __future__ import annotations

import re
from typing import Any

from peftkit.config.schema import LoraAdapterConfig

INIT_TO_PEFT: dict[str, Any] = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "eva": "eva", "loftq": "loftq"}
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS"}


def lora_config(cfg: LoraAdapterConfig, task: str = "causal_lm") -> Any:
    from peft import LoraConfig

    layers = list(range(cfg.layers[0], cfg.layers[1] + 1)) if cfg.layers else None
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        init_lora_weights=INIT_TO_PEFT[cfg.init],
        layers_to_transform=layers,
        modules_to_save=cfg.modules_to_save,
        task_type=TASK_TYPES[task],
    )


def matches_target(name: str, target: str | list[str], linear_names: set[str]) -> bool:
    """Mirror of peft's matching, used to validate targets before any weights load."""
    if target == "all-linear":
        return name in linear_names
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in target)
