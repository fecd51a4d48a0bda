"""Adapter methods, registered by name. Each turns the recipe's `adapter:` block into peft calls."""

from __future__ import annotations

import logging
from typing import Any

import torch

from peftkit.adapters import lora, qlora
from peftkit.config.schema import LoraAdapterConfig, QLoraAdapterConfig, QuantizationConfig, Recipe
from peftkit.errors import ConfigError

log = logging.getLogger(__name__)

METHODS = ("lora", "qlora")


def effective_quantization(recipe: Recipe) -> QuantizationConfig | None:
    """The quantization a recipe implies: its own block, or nf4 for `qlora` without one."""
    if recipe.quantization is not None:
        return recipe.quantization
    if isinstance(recipe.adapter, QLoraAdapterConfig):
        return qlora.DEFAULT_QUANTIZATION
    return None


def linear_module_names(model: torch.nn.Module) -> dict[str, str]:
    """Full name -> class name of every linear-like leaf module (what LoRA can target)."""
    names = {}
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, torch.nn.Linear) or kind in {"Linear4bit", "Linear8bitLt", "Conv1D"}:
            names[name] = kind
    return names


def all_linear_targets(model: torch.nn.Module) -> set[str]:
    """What peft's `all-linear` selects: every linear layer except the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = {n for n, m in model.named_modules() if head is not None and m is head}
    head_names |= {n for n in linear_module_names(model) if n.split(".")[-1] in {"lm_head", "score", "classifier"}}
    return set(linear_module_names(model)) - head_names


def check_targets(model: torch.nn.Module, cfg: LoraAdapterConfig) -> list[str]:
    """Problems with target_modules / layers against the real module tree (a meta-device copy is enough)."""
    problems = []
    linear = all_linear_targets(model)
    matched = [n for n in linear_module_names(model) if lora.matches_target(n, cfg.target_modules, linear)]
    if not matched:
        suffixes = sorted({n.split(".")[-1] for n in linear})
        problems.append(
            f"adapter.target_modules {cfg.target_modules!r} matches no linear module in this model; "
            f"its linear modules are: {', '.join(suffixes)} (or use `all-linear`)"
        )
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if cfg.layers is not None and n_layers is not None and cfg.layers[1] >= n_layers:
        problems.append(f"adapter.layers {list(cfg.layers)} is out of range: this model has layers 0..{n_layers - 1}")
    return problems


def build_adapter(model: Any, cfg: LoraAdapterConfig, *, task: str = "causal_lm", quantized: bool = False) -> Any:
    """Wrap `model` with the adapter; returns the peft model with only adapter weights trainable."""
    from peft import get_peft_model

    problems = check_targets(model, cfg)
    if problems:
        raise ConfigError(problems)
    if quantized:
        model = qlora.prepare(model, gradient_checkpointing=getattr(cfg, "gradient_checkpointing", False))
    peft_model = get_peft_model(model, lora.lora_config(cfg, task))
    return peft_model


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total), counting 4-bit packed weights at their logical size."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if type(param).__name__ == "Params4bit":
            count *= 2
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total
