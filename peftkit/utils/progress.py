"""Progress bars for long loops (tokenizing, evaluation batches): tqdm, cleared when done."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def with_progress(items: Iterable[T], desc: str | None, unit: str) -> Iterable[T]:
    """`items` shown as a progress bar named `desc` while they are iterated, or as they are when `desc` is None."""
    if desc is None:
        return items
    from tqdm.auto import tqdm

    bar: Any = tqdm(items, desc=desc, unit=unit, leave=False)
    return bar
