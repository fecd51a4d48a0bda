"""Findings said once per process: a command reads its data more than once (the recipe check, validate's data line,
--show-data; training with base-answered replay), and each read would say the same again."""

from __future__ import annotations

import logging
from collections.abc import Hashable

_SAID: set[Hashable] = set()


def say_once(logger: logging.Logger, level: int, message: str, key: Hashable = None) -> None:
    """Log `message` at `level` unless it (or `key`, where the message alone does not name what it is about) was
    said already. Where `logger` would not show it (a read with its warnings silenced), nothing is said, and so
    nothing is kept back from a later read that shows it."""
    key = message if key is None else (message, key)
    if key not in _SAID and logger.isEnabledFor(level):
        _SAID.add(key)
        logger.log(level, "%s", message)
