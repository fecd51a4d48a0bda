"""Compute a batch's shared prompt prefix once instead of once per row.

Domain chat data repeats the same system prompt (and template tokens) at the start of every
conversation: often a third to a half of all tokens. In a causal model those positions have the
same hidden states in every row, so we run the prefix once (batch of 1), broadcast its key/value
cache to the batch, and run only the remaining tokens. Gradients flow back through the broadcast
cache, so the loss and the adapter gradients equal the unshared computation (exactly, up to float
rounding, when dropout is off).
"""

from __future__ import annotations

from typing import Any

import torch

MIN_SHARED_PREFIX = 8
"""Below this many tokens the extra forward call costs more than it saves."""


def shared_prefix_length(input_ids: torch.Tensor, keep: torch.Tensor) -> int:
    """Longest prefix identical in every row that ends before the first supervised prediction."""
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0)
    length = int(same.long().cumprod(0).sum())
    first_kept = keep.long().argmax(dim=1)[keep.any(dim=1)]
    if first_kept.numel():
        length = min(length, int(first_kept.min()))
    # Leave at least one token per row for the second call.
    return min(length, input_ids.shape[1] - 1)


def attention_window(model: Any) -> int | None:
    """The sliding attention window of `model`'s layers (Gemma 2/3, Mistral v0.1, Phi-3), None without one.

    Sharing the prefix is only exact while every row fits in the window: beyond it the model's own cache
    drops the earliest keys of the sliding layers, and the prefix cache broadcast here keeps them."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return int(window) if "sliding_attention" in layer_types else None
    return int(window) if getattr(config, "use_sliding_window", True) else None


def _broadcast_cache(cache: Any, batch: int) -> Any:
    from transformers import DynamicCache

    expanded = DynamicCache()
    for index, layer in enumerate(cache.layers):
        expanded.update(layer.keys.expand(batch, *layer.keys.shape[1:]),
                        layer.values.expand(batch, *layer.values.shape[1:]), index)
    return expanded


def forward_with_shared_prefix(model: Any, inputs: dict[str, torch.Tensor], keep: torch.Tensor, prefix: int) -> Any:
    """Model outputs for `inputs` with logits only where `keep`; the first `prefix` tokens run once."""
    input_ids = inputs["input_ids"]
    batch = input_ids.shape[0]
    head = model(input_ids=input_ids[:1, :prefix], use_cache=True, logits_to_keep=1)
    cache = _broadcast_cache(head.past_key_values, batch)
    return model(
        input_ids=input_ids[:, prefix:],
        attention_mask=inputs.get("attention_mask"),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=keep[:, prefix:],
    )
