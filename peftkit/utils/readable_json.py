"""JSON for files people read: `東京` as itself, not `\\u6771\\u4eac`."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def readable_json(data: Any, *, indent: int | None = None, default: Callable[[Any], Any] | None = None) -> str:
    """`json.dumps` keeping non-ASCII text as it is. Text that UTF-8 cannot hold (a lone surrogate, which a
    `\\ud800` escape in a data file reads as) keeps the escapes instead, so writing the file cannot fail on it."""
    text = json.dumps(data, indent=indent, default=default, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(data, indent=indent, default=default)
    return text
