"""One export at a time into an output folder.

Two exports to the same `--out` would each load, merge and verify, and the second to finish would find the first's
folder in place (or replace it with --force): the second is refused as soon as it names the folder. The lock is an
flock on a hidden sibling file, so the OS releases it when the holder ends, killed or not.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from peftkit.errors import ExportError
from peftkit.utils.flock import lock_now, write_holder

F = TypeVar("F", bound=Callable[..., Any])

_held: dict[Path, IO[str]] = {}
_created: list[Path] = []
"""Folders above an output that a claim created for its lock file: removed again at release when still empty."""
_depth = 0


def lock_path(target: Path) -> Path:
    return target.with_name(f".lock-{target.name}")


def claim(target: Path) -> None:
    """Hold `target` for this process until the outermost `@releases_claims` export returns (or the process ends);
    raise when another process holds it."""
    target = Path(target)
    if target in _held or not _depth:  # outside an export (a direct call of prepare_output): nothing to release it
        return
    try:
        import fcntl  # noqa: F401 - only to know it is there
    except ImportError:  # not on POSIX: no lock
        return
    path = lock_path(target)
    for _ in range(10):  # the holder may remove the file between our open and our lock: then lock the new one
        try:
            _make_folders(path.parent)
            handle = path.open("a+", encoding="utf-8")
        except OSError:  # a folder this process cannot write: the export's own write check says so
            return
        holder = lock_now(handle)
        if holder is not None:
            handle.close()
            raise ExportError(f"another peftkit export is writing {target} now ({holder or 'another process'}); wait "
                              "for it to end, or choose another --out")
        try:
            same_file = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        handle.close()
    else:
        return
    write_holder(handle)
    _held[target] = handle


def _make_folders(folder: Path) -> None:
    missing = [f for f in (folder, *folder.parents) if not f.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    _created.extend(missing)  # deepest first


def release_all() -> None:
    if _held:
        import fcntl

        for target, handle in list(_held.items()):
            with contextlib.suppress(OSError):
                lock_path(target).unlink()  # while still held: a process waiting on this file then locks a removed one
            fcntl.flock(handle, fcntl.LOCK_UN)  # and sees that, by its inode check
            handle.close()
            del _held[target]
    for folder in _created:  # an export that failed before writing leaves no empty folders behind
        with contextlib.suppress(OSError):
            folder.rmdir()
    _created.clear()


def releases_claims(export: F) -> F:
    """An export function: the folders it claimed are free again when it returns or raises (the outermost one, when
    exports call each other)."""

    @functools.wraps(export)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _depth
        _depth += 1
        try:
            return export(*args, **kwargs)
        finally:
            _depth -= 1
            if _depth == 0:
                release_all()

    return wrapper  # type: ignore[return-value]
