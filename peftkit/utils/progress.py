"""Progress bars for long loops (tokenizing, evaluation batches): tqdm, cleared when done on a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def with_progress(items: Iterable[T], desc: str | None, unit: str) -> Iterable[T]:
    """`items` shown as a progress bar named `desc` while they are iterated, or as they are when `desc` is None. In a
    log file the finished bar stays as a line of its own (cleared, it left its last state and the next log line
    joined on one line)."""
    if desc is None:
        return items
    from tqdm.auto import tqdm

    bar: Any = tqdm(items, desc=desc, unit=unit, leave=not sys.stderr.isatty())
    return bar
