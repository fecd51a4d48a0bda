"""Prompt tuning: trained soft-prompt embeddings prepended to the input (`peft.PromptTuningConfig`).

The virtual tokens are real sequence positions: logits come back `num_virtual_tokens` longer
than the input, which the SFT trainer accounts for (`trainer._virtual_tokens`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from peftkit.adapters.registry import PEFT_TASK_TYPES, AdapterMethod, register
from peftkit.config.schema import PromptTuningAdapterConfig
from peftkit.errors import ConfigError


def tokenizer_path(model: Any) -> str | None:
    """peft's text init loads the tokenizer by path: the model's own directory when it has one."""
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if path and Path(path).is_dir() and any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return str(path)
    return None


def prompt_config(model: Any, cfg: PromptTuningAdapterConfig, task: str = "causal_lm") -> Any:
    from peft import PromptTuningConfig

    kwargs: dict[str, Any] = {}
    if cfg.init == "text":
        path = tokenizer_path(model)
        if path is None:
            raise ConfigError(
                "adapter.init: text needs the model's tokenizer next to its weights (a local model directory); "
                "use init: random for this model"
            )
        kwargs = {"prompt_tuning_init_text": cfg.init_text, "tokenizer_name_or_path": path}
    return PromptTuningConfig(
        task_type=PEFT_TASK_TYPES[task],
        num_virtual_tokens=cfg.num_virtual_tokens,
        prompt_tuning_init="TEXT" if cfg.init == "text" else "RANDOM",
        **kwargs,
    )


def check(model: torch.nn.Module, cfg: PromptTuningAdapterConfig, task: str = "causal_lm") -> list[str]:
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions is not None and cfg.num_virtual_tokens >= max_positions:
        return [f"adapter.num_virtual_tokens ({cfg.num_virtual_tokens}) must be below the model's {max_positions} positions"]
    return []


def build(model: Any, cfg: PromptTuningAdapterConfig, *, task: str = "causal_lm", quantized: bool = False, calibration: Any = None) -> Any:
    from peft import get_peft_model

    problems = check(model, cfg, task)
    if problems:
        raise ConfigError(problems)
    return get_peft_model(model, prompt_config(model, cfg, task))


METHOD = register(
    AdapterMethod(name="prompt_tuning", config_class=PromptTuningAdapterConfig, build=build, check=check, tasks=("causal_lm",))
)
