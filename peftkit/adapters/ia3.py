"""(IA)^3: learned scaling vectors on keys, values and feed-forward inputs (`peft.IA3Config`).

Without `target_modules` peft's per-architecture defaults apply (Llama: k_proj, v_proj,
down_proj, of which down_proj is feed-forward); for architectures peft has no entry for, the same
roles found by their module names. When only `target_modules` is given, the
feed-forward set defaults to peft's feed-forward modules among those targets.
"""

from __future__ import annotations

from typing import Any

import torch

from peftkit.adapters.lora import check_modules_to_save
from peftkit.adapters.modules import selected_linear, target_problems, text_decoder
from peftkit.adapters.registry import PEFT_TASK_TYPES, AdapterMethod, register
from peftkit.config.schema import IA3AdapterConfig
from peftkit.errors import ConfigError


def _defaults(model: torch.nn.Module) -> tuple[list[str] | None, list[str] | None]:
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
    )

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    table = TARGETS.get(model_type)
    # peft's table can name modules a newer transformers no longer has (Mixtral's `w2`: the experts are fused now)
    if table and all(selected_linear(model, [name]) for name in table):
        return table, FEEDFORWARD.get(model_type)
    return _defaults_by_name(model)


_KEY_VALUE_NAMES = (["k_proj", "v_proj"], ["qkv_proj"], ["query_key_value"], ["Wqkv"], ["c_attn"])
_FEEDFORWARD_NAMES = ("down_proj", "fc2", "dense_4h_to_h", "w2", "mlp.c_proj")


def _defaults_by_name(model: torch.nn.Module) -> tuple[list[str] | None, list[str] | None]:
    """peft's rule for architectures it has no table entry for (Phi-3, OLMo-2, Granite, StableLM, Starcoder2,
    ...), or whose entry names modules the model does not have: scale the keys and values and the input of the
    MLP's output projection, found by the names transformers gives them."""
    def present(name: str) -> bool:
        return bool(selected_linear(model, [name]))

    key_value = next((names for names in _KEY_VALUE_NAMES if all(present(n) for n in names)), None)
    feedforward = next((name for name in _FEEDFORWARD_NAMES if present(name)), None)
    if key_value is None:
        return None, None
    if feedforward is None:  # no linear MLP output (an MoE with fused experts): keys and values only
        return key_value, []
    return [*key_value, feedforward], [feedforward]


def resolve(model: torch.nn.Module, cfg: IA3AdapterConfig) -> tuple[str | list[str] | None, str | list[str] | None]:
    """(target_modules, feedforward_modules) as they will be passed to peft."""
    default_targets, default_ff = _defaults(model)
    targets = cfg.target_modules if cfg.target_modules is not None else default_targets
    feedforward = cfg.feedforward_modules
    if feedforward is None and targets is not None:
        names = selected_linear(model, targets)
        feedforward = [f for f in default_ff or [] if names.keys() & selected_linear(model, [f]).keys()]
    return targets, feedforward


def check(model: torch.nn.Module, cfg: IA3AdapterConfig, task: str = "causal_lm") -> list[str]:
    targets, feedforward = resolve(model, cfg)
    if targets is None:
        return [f"adapter.target_modules: peft has no (IA)^3 default for {type(model).__name__} and its key / value and "
                "MLP output projections have unfamiliar names; list the modules to scale (and `feedforward_modules`)"]
    names, problems = target_problems("adapter.target_modules", targets, model)
    if names and not problems and feedforward:
        scaled_inputs = selected_linear(model, feedforward)
        if any(n not in names for n in scaled_inputs) or not any(n in scaled_inputs for n in names):
            problems.append(f"adapter.feedforward_modules {feedforward!r} must be among the target_modules {targets!r}")
    problems.extend(check_modules_to_save(model, cfg.modules_to_save))
    return problems


def build(model: Any, cfg: IA3AdapterConfig, *, task: str = "causal_lm", quantized: bool = False, calibration: Any = None) -> Any:
    from peft import IA3Config, get_peft_model

    problems = check(model, cfg, task)
    if problems:
        raise ConfigError(problems)
    targets, feedforward = resolve(model, cfg)
    if text_decoder(model) is not None:  # peft's suffix matching would also scale the vision tower's projections
        targets, feedforward = sorted(selected_linear(model, targets)), sorted(selected_linear(model, feedforward))
    config = IA3Config(
        task_type=PEFT_TASK_TYPES[task],
        target_modules=targets,
        feedforward_modules=feedforward or [],
        modules_to_save=cfg.modules_to_save,
    )
    return get_peft_model(model, config)


METHOD = register(AdapterMethod(name="ia3", config_class=IA3AdapterConfig, build=build, check=check))
