"""Atomic writes: a file or directory is either complete or absent, never half-written.

We write to a hidden temporary sibling (same file system), fsync, then rename into place.
A process killed mid-write leaves only a `.tmp-*` sibling, which is ignored and cleaned later.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    with contextlib.suppress(OSError):  # directory fsync is not supported everywhere
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: Path, *, exist_ok: bool = False, replace: bool = False) -> Iterator[Path | None]:
    """Yield a temporary directory that becomes `target` when the block succeeds.

    exist_ok: if `target` appears meanwhile (another process won), yield None and keep it.
    replace: swap out an existing `target` (the old one is removed only after the new one is in place).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and exist_ok and not replace:
        yield None
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            if exist_ok and not replace:
                shutil.rmtree(tmp)
                return
            if not replace:
                raise FileExistsError(f"{target} already exists")
            old = target.with_name(f".old-{target.name}-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temp sibling + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
