"""Prefix tuning: trained key/value prefixes in every attention layer (`peft.PrefixTuningConfig`).

The prefix lives in the KV cache. peft injects it as the initial cache when generation starts;
with `generate(use_cache=False)` transformers still hands the injected cache to the next step
while recomputing the full sequence, and the shapes no longer agree (a RuntimeError in
transformers 5 / peft 0.21). Greedy or sampled tokens do not depend on whether the cache is
used, so peftkit makes generation of prefix-tuned models always use it (`generation_fix`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from peftkit.adapters.registry import PEFT_TASK_TYPES, AdapterMethod, register
from peftkit.config.schema import PrefixTuningAdapterConfig
from peftkit.errors import ConfigError

log = logging.getLogger(__name__)

FIXED_ATTR = "peftkit_generate_fixed"


def prefix_config(model: Any, cfg: PrefixTuningAdapterConfig, task: str = "causal_lm") -> Any:
    from peft import PrefixTuningConfig

    hidden = getattr(model.config, "hidden_size", None)
    return PrefixTuningConfig(
        task_type=PEFT_TASK_TYPES[task],
        num_virtual_tokens=cfg.num_virtual_tokens,
        prefix_projection=cfg.prefix_projection,
        encoder_hidden_size=cfg.encoder_hidden_size or hidden,
        **(_cache_shape(model) if task == "causal_lm" else {}),
    )


def _cache_shape(model: Any) -> dict[str, int]:
    """The prefix's shape as the model's KV cache holds it, for configs peft cannot read it from.

    peft sizes the prefix from `num_key_value_heads` when the config has it, else from `num_attention_heads`:
    wrong for multi-query models that name their key/value heads otherwise (Falcon's `multi_query`,
    `num_kv_heads`, which its code reads instead of a `num_key_value_heads` the config may also carry), whose
    first training step then fails inside attention. One token through the model shows the cache's real shape;
    nothing is overridden where it agrees with peft's reading, or where the probe cannot run (e.g. weights already
    partitioned by ZeRO-3)."""
    config = model.config
    if not hasattr(config, "num_attention_heads"):
        return {}
    peft_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    try:
        one_token = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)
        with torch.no_grad():
            cache = model(input_ids=one_token, use_cache=True).past_key_values
        keys = [layer.keys for layer in cache.layers]
    except Exception as exc:  # noqa: BLE001 - an optional refinement; peft's own sizing stays
        log.debug("could not probe the KV cache shape (%s); peft sizes the prefix from the config", exc)
        return {}
    heads, head_dim = keys[0].shape[1], keys[0].shape[-1]
    if any(k.shape[1] != heads or k.shape[-1] != head_dim for k in keys) or heads == peft_heads:
        return {}
    if getattr(config, "num_key_value_heads", None):  # peft reads it over any size it is given
        raise ConfigError(f"prefix tuning: this {config.model_type} model caches {heads} key/value head(s), but its "
                          f"config says num_key_value_heads={config.num_key_value_heads}, which peft sizes the prefix "
                          "from (training would fail inside attention): correct or remove num_key_value_heads in the "
                          "model's config.json, or use another adapter method")
    log.info("prefix tuning: the model caches %d key/value head(s) of %d, not %d heads; the prefix is sized to match",
             heads, head_dim, peft_heads)
    return {"num_layers": len(keys), "num_attention_heads": heads, "token_dim": heads * head_dim}


def check(model: torch.nn.Module, cfg: PrefixTuningAdapterConfig, task: str = "causal_lm") -> list[str]:
    """peft sizes the prefix from the model config (causal LMs only, see `tasks`); but the text's positions start
    after the prefix, so a learned position table (GPT-2) must hold more than it."""
    from peftkit.models.skeleton import learned_position_limit

    learned = learned_position_limit(model)
    if learned is not None and cfg.num_virtual_tokens >= learned:
        return [f"adapter.num_virtual_tokens ({cfg.num_virtual_tokens}) must be below the model's {learned} learned "
                "positions: the text's positions start after the prefix"]
    return []


def build(model: Any, cfg: PrefixTuningAdapterConfig, *, task: str = "causal_lm", quantized: bool = False, calibration: Any = None) -> Any:
    from peft import get_peft_model

    problems = check(model, cfg, task)
    if problems:
        raise ConfigError(problems)
    peft_model = get_peft_model(model, prefix_config(model, cfg, task))
    generation_fix(peft_model)
    return peft_model


def is_prefix_model(model: Any) -> bool:
    from peftkit.models.skeleton import active_peft_config

    config = active_peft_config(model)
    return config is not None and str(getattr(config, "peft_type", "")).endswith("PREFIX_TUNING")


def generation_fix(model: Any) -> Any:
    """Make `model.generate(use_cache=False)` work for a prefix-tuned model (same tokens, via the cache)."""
    if not is_prefix_model(model) or getattr(model, FIXED_ATTR, False):
        return model
    original = model.generate

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("use_cache") is False:
            log.debug("prefix tuning keeps its prefix in the KV cache: generating with use_cache=True")
            kwargs["use_cache"] = True
        config = kwargs.get("generation_config")
        if config is not None and getattr(config, "use_cache", True) is False:
            import copy

            kwargs["generation_config"] = config = copy.copy(config)
            config.use_cache = True
        return original(*args, **kwargs)

    model.generate = generate
    setattr(model, FIXED_ATTR, True)
    return model


METHOD = register(
    AdapterMethod(name="prefix_tuning", config_class=PrefixTuningAdapterConfig, build=build, check=check, tasks=("causal_lm",))
)
