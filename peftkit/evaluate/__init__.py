"""Evaluation: held-out loss, generation-based fact accuracy.

The names below load on first use: the `peftkit` command imports this package to register `eval`, and torch
(which generation needs) would otherwise make every command, `--version` included, start seconds later."""

from typing import Any

__all__ = ["Reply", "generate_replies", "heldout_accuracy", "is_correct"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from peftkit.evaluate import generation

        return getattr(generation, name)
    raise AttributeError(f"module 'peftkit.evaluate' has no attribute {name!r}")
