"""A weightless copy of a model (meta device), to check module names before loading weights."""

from __future__ import annotations

from typing import Any

import torch

from peftkit.config.schema import ModelConfig
from peftkit.models.registry import peftkit_home
from peftkit.models.resolve import ModelSource, needs_remote_code, remote_code_error


def load_config(source: ModelSource, cfg: ModelConfig) -> Any:
    from transformers import AutoConfig

    if source.is_gguf and source.path is not None:
        from peftkit.models.gguf_config import converted_config
        from peftkit.models.gguf_convert import cached_model_dir, check_gguf_supported, conversion_is_current

        cached = cached_model_dir(source.path, peftkit_home())
        if conversion_is_current(cached):
            return AutoConfig.from_pretrained(str(cached))
        check_gguf_supported(source.path)
        return converted_config(source.path)
    target = str(source.path) if source.path is not None else source.ref
    try:
        return AutoConfig.from_pretrained(target, revision=source.revision, trust_remote_code=cfg.trust_remote_code)
    except ValueError as exc:
        if needs_remote_code(exc):
            raise remote_code_error(source.ref) from None
        raise


def model_skeleton(source: ModelSource, cfg: ModelConfig, task: str = "causal_lm") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = load_config(source, cfg)
    auto = AutoModelForSequenceClassification if task == "sequence_classification" else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=cfg.trust_remote_code)
