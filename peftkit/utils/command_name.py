"""How the user started peftkit, for the command lines it prints to copy: `peftkit`, or `python -m peftkit`."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

COMMAND = ["peftkit"]
"""`peftkit/__main__.py` replaces it with the interpreter and `-m peftkit`."""


def started_as_module() -> None:
    """`python -m peftkit`: name the interpreter by its path unless the same one is found on PATH by name (a virtual
    environment's python run without activating it is not the `python` a shell finds)."""
    name = Path(sys.executable).name
    found = shutil.which(name)
    same = found is not None and Path(found).resolve() == Path(sys.executable).resolve()
    COMMAND[:] = [name if same else sys.executable, "-m", "peftkit"]


def command(*args: str) -> str:
    """`peftkit ARGS...` as the user would type it, quoted for a shell."""
    return shlex.join([*COMMAND, *args])
