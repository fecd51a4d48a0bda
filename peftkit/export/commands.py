"""CLI sub-commands of the export area (`merge`, `export`)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add this area's sub-commands to the `peftkit` parser."""
