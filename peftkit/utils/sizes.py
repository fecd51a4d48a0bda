"""Byte counts as people read them in messages."""

from __future__ import annotations


def readable_size(n: float) -> str:
    """`1.4 GB`, `19.6 MB`, `300.0 KB`, `512 B` (decimal units, as `df -H` and file managers show them)."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
