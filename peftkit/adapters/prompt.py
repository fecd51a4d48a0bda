"""Prompt tuning: trained soft-prompt embeddings prepended to the input (`peft.PromptTuningConfig`).

The virtual tokens are real sequence positions: logits come back `num_virtual_tokens` longer
than the input, which the SFT trainer accounts for (`trainer._virtual_tokens`).

Batched generation pads on the left, and peft ignores position ids for prompt tuning, so a
padded row sees its soft prompt `pad` positions further away than in training (right-padded):
measured 1e-3 logit differences on the tiny model. `generation_fix` makes `generate` run each
group of equal-length prompts unpadded, so batched replies equal one-at-a-time replies.
"""

from __future__ import annotations

import functools
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
    """The soft prompt takes sequence positions: a learned position table (the real limit where a model has one) or
    the configured context must hold more than it."""
    from peftkit.models.skeleton import learned_position_limit

    max_positions = learned_position_limit(model) or getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions is not None and cfg.num_virtual_tokens >= max_positions:
        return [f"adapter.num_virtual_tokens ({cfg.num_virtual_tokens}) must be below the model's {max_positions} positions"]
    return []


def build(model: Any, cfg: PromptTuningAdapterConfig, *, task: str = "causal_lm", quantized: bool = False, calibration: Any = None) -> Any:
    from peft import get_peft_model

    problems = check(model, cfg, task)
    if problems:
        raise ConfigError(problems)
    return generation_fix(get_peft_model(model, prompt_config(model, cfg, task)))


FIXED_ATTR = "peftkit_prompt_generate_fixed"


def is_prompt_tuning_model(model: Any) -> bool:
    from peftkit.models.skeleton import active_peft_config

    config = active_peft_config(model)
    return config is not None and str(getattr(config, "peft_type", "")).endswith("PROMPT_TUNING")


def _unpadded_groups(attention_mask: torch.Tensor) -> dict[int, list[int]]:
    lengths = attention_mask.sum(dim=1).tolist()
    groups: dict[int, list[int]] = {}
    for row, length in enumerate(lengths):
        groups.setdefault(int(length), []).append(row)
    return groups


def generation_fix(model: Any) -> Any:
    """Generate left-padded batches of a prompt-tuned model as unpadded equal-length groups."""
    if not is_prompt_tuning_model(model) or getattr(model, FIXED_ATTR, False):
        return model
    original = model.generate

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        input_ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        plain = not args and kwargs.get("streamer") is None and not kwargs.get("return_dict_in_generate")
        if not plain or input_ids is None or mask is None or bool(mask.all()) or bool((mask[:, -1] == 0).any()):
            return original(*args, **kwargs)  # nothing to fix (or not a left-padded plain call)
        pad = kwargs.get("pad_token_id")
        if pad is None:
            pad = getattr(model.generation_config, "pad_token_id", None) or 0
        width = input_ids.shape[1]
        pieces: dict[int, torch.Tensor] = {}
        for length, rows in _unpadded_groups(mask).items():
            sub = {**kwargs, "input_ids": input_ids[rows, width - length :], "attention_mask": mask[rows, width - length :]}
            out = original(**sub)
            for i, row in enumerate(rows):
                pieces[row] = torch.cat([input_ids[row], out[i, length:]])
        longest = max(p.shape[0] for p in pieces.values())
        result = torch.full((input_ids.shape[0], longest), int(pad), dtype=input_ids.dtype, device=input_ids.device)
        for row, piece in pieces.items():
            result[row, : piece.shape[0]] = piece
        return result

    model.generate = generate
    setattr(model, FIXED_ATTR, True)
    return model


METHOD = register(
    AdapterMethod(name="prompt_tuning", config_class=PromptTuningAdapterConfig, build=build, check=check, tasks=("causal_lm",))
)
