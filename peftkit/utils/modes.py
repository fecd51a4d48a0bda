"""Run a block with a module in eval mode, or a tokenizer padded on another side, and give it back as it was."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def padding_side(tokenizer: Any, side: str) -> Iterator[Any]:
    """Pad on `side` in the block. A fast tokenizer's Rust backend keeps the padding (and truncation) of its last
    padded call, and `save_pretrained` writes that into tokenizer.json, where a reload reads its side: both are put
    back too, so a run's saved tokenizer pads as the base model's did."""
    before = tokenizer.padding_side
    backend = getattr(tokenizer, "_tokenizer", None)
    padding = getattr(backend, "padding", None)
    truncation = getattr(backend, "truncation", None)
    tokenizer.padding_side = side
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = before
        if backend is not None and hasattr(backend, "no_padding"):
            if padding is None:
                backend.no_padding()
            else:
                backend.enable_padding(**padding)
            if truncation is None:
                backend.no_truncation()
            else:
                backend.enable_truncation(**truncation)
