"""CLI sub-commands of the evaluation area (`eval`)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Add this area's sub-commands to the `peftkit` parser."""
