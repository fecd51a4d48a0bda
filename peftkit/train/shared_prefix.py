"""Compute a batch's shared prompt prefix once instead of once per row.

Domain chat data repeats the same system prompt (and template tokens) at the start of every
conversation: often a third to a half of all tokens. In a causal model those positions have the
same hidden states in every row, so we run the prefix once per step (batch of 1), broadcast its
key/value cache to the rows (of each length bucket), and run only the remaining tokens. Gradients
flow back through the broadcast cache, so the loss and the adapter gradients equal the unshared
computation (exactly, up to float rounding, when dropout is off).
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


def batch_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor) -> int:
    """The prefix a (right-padded) batch shares, run once per step: 0 when it is too short to be worth a call.
    Every row, and so every length bucket cut to its longest row, keeps at least one token after it."""
    length = min(shared_prefix_length(input_ids, keep), int(attention_mask.sum(dim=1).min()) - 1)
    return length if length >= MIN_SHARED_PREFIX else 0


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


class SharedPrefix:
    """A batch's shared prompt prefix, run once (batch of 1): its length and each layer's keys and values.

    Every length bucket of the batch continues from this one cache. Buckets back-propagated early (to free their
    activations) run on a `detached()` copy, whose gradients `pending_gradient()` later hands to the prefix's own
    graph in the last bucket's backward: the prefix runs forward and backward once per step, not once per bucket."""

    def __init__(self, length: int, states: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.length = length
        self.states = states

    @classmethod
    def run(cls, model: Any, input_ids: torch.Tensor, length: int) -> "SharedPrefix | str":
        """The prefix of `input_ids`' first row, run; or why this model's cache cannot be shared (a string)."""
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        head = model(input_ids=input_ids[:1, :length], use_cache=True, logits_to_keep=1)
        layers = getattr(head.past_key_values, "layers", None) or []
        # Linear-attention, KV-sharing, indexed or quantized layers keep more (or other) state than keys and values.
        other = {type(layer).__name__ for layer in layers if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer)
                 or not isinstance(layer.keys, torch.Tensor)}
        if other or not layers:
            return f"the model's cache ({', '.join(sorted(other)) or type(head.past_key_values).__name__}) holds " \
                   "more than each layer's keys and values"
        return cls(length, [(layer.keys, layer.values) for layer in layers])

    @property
    def requires_grad(self) -> bool:
        return any(t.requires_grad for pair in self.states for t in pair)

    def cache(self, batch: int) -> Any:
        """The prefix's cache broadcast to `batch` rows (views: gradients sum back to the one prefix)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for index, (keys, values) in enumerate(self.states):
            cache.update(keys.expand(batch, *keys.shape[1:]), values.expand(batch, *values.shape[1:]), index)
        return cache

    def detached(self) -> "SharedPrefix":
        """The same values as leaves that collect the gradients of the buckets run on them (only where the prefix
        itself needs one: frozen lower layers are not back-propagated into)."""
        return SharedPrefix(self.length, [(k.detach().requires_grad_(k.requires_grad), v.detach().requires_grad_(v.requires_grad))
                                          for k, v in self.states])

    def pending_gradient(self, detached: "SharedPrefix") -> torch.Tensor:
        """A zero to add to the returned loss: its backward passes `detached`'s collected gradients into this prefix."""
        pairs = [(t, leaf) for own, copy in zip(self.states, detached.states) for t, leaf in zip(own, copy) if t.requires_grad]
        tensors = [t for t, _ in pairs]
        grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for _, leaf in pairs]
        return _InjectGradient.apply(len(tensors), *tensors, *grads)


class _InjectGradient(torch.autograd.Function):
    """Zero in value; in backward, hands each tensor its given gradient as is. The gradients come from backward
    calls already made through the Trainer's scaling (accelerator.backward), so the incoming one is not applied."""

    @staticmethod
    def forward(ctx: Any, count: int, *tensors_and_grads: torch.Tensor) -> torch.Tensor:
        ctx.grads = tensors_and_grads[count:]
        return tensors_and_grads[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, _: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (None, *ctx.grads, *([None] * len(ctx.grads)))


def forward_after_prefix(model: Any, inputs: dict[str, torch.Tensor], keep: torch.Tensor, prefix: SharedPrefix) -> Any:
    """Model outputs for `inputs` with logits only where `keep`, continuing from the rows' shared `prefix`."""
    input_ids = inputs["input_ids"]
    return model(
        input_ids=input_ids[:, prefix.length:],
        attention_mask=inputs.get("attention_mask"),
        past_key_values=prefix.cache(input_ids.shape[0]),
        use_cache=True,
        logits_to_keep=keep[:, prefix.length:],
    )
