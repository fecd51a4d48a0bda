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


BIDIRECTIONAL_UNLESS_DECODER = frozenset({
    "bert", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert", "reformer", "rembert",
    "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta", "xlm-roberta-xl", "xmod"})
"""Encoders that transformers also builds as causal LMs, whose attention is causal only with `is_decoder: true`
(their masked-LM checkpoints have it off: each position sees the whole text)."""


def bidirectional_problem(config: Any, name: str) -> str | None:
    """Why `config`'s model cannot be trained as a causal LM (chat SFT): an encoder whose attention sees the tokens
    it is asked to predict would learn nothing a generator can use, with a loss that looks excellent."""
    model_type = getattr(config, "model_type", None)
    if model_type not in BIDIRECTIONAL_UNLESS_DECODER or getattr(config, "is_decoder", False):
        return None
    return (f"{name} is a {model_type} encoder (is_decoder: false): its attention sees the whole text, so trained as "
            "a causal LM it would read the tokens it is meant to predict. Use `task: sequence_classification` for "
            "it, or a decoder model (Llama, Qwen, SmolLM2, ...) for chat")


def model_skeleton(source: ModelSource, cfg: ModelConfig, task: str = "causal_lm",
                   num_labels: int | None = None) -> torch.nn.Module:
    """The model's modules on the meta device (no weights); a classifier with `num_labels` outputs where given."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = load_config(source, cfg)
    if num_labels is not None:
        config.num_labels = num_labels
    auto = AutoModelForSequenceClassification if task == "sequence_classification" else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=cfg.trust_remote_code)


def active_peft_config(model: Any) -> Any:
    """The PEFT config of `model`'s active adapter; None for a model without one."""
    return getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))


def input_embedding_rows(model: torch.nn.Module) -> int:
    """The token ids `model` has an embedding for. A LoRA on `embed_tokens`, or trainable tokens, wrap the embedding
    in a peft layer without `num_embeddings`; under ZeRO-3 the weight's own shape is empty (`ds_shape` is the real one)."""
    module = model.get_input_embeddings()
    rows = getattr(module, "num_embeddings", None)
    if rows is None:
        weight = module.weight
        rows = (getattr(weight, "ds_shape", None) or weight.shape)[0]
    return int(rows)


def learned_position_limit(model: torch.nn.Module) -> int | None:
    """How many tokens a model with learned absolute position embeddings (GPT-2, OPT, BERT) can take at all: a longer
    input indexes past its position table and fails deep inside the forward pass. None for models whose positions are
    computed (RoPE, ALiBi), which run past their trained context, only worse."""
    config = getattr(model, "config", None)
    limit = (getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
             or getattr(config, "max_seq_len", None))  # MPT
    if not isinstance(limit, int) or limit <= 0:
        return None
    tokens = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.Embedding) and module is not tokens and limit <= module.num_embeddings <= limit + 2
                and ("pos" in name.rsplit(".", 1)[-1] or name.endswith("wpe"))):
            if module.padding_idx is not None:  # RoBERTa / XLM-R count positions from padding_idx + 1
                return module.num_embeddings - module.padding_idx - 1
            return limit  # OPT's table has 2 extra rows for its position offset
    return None


def trained_context(model: torch.nn.Module) -> int | None:
    """The context length the model was trained for, from its config (None if it does not say)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return limit if isinstance(limit, int) and limit > 0 else None
