"""Atomic writes: a file or directory is either complete or absent, never half-written.

We write to a hidden temporary sibling (same file system), fsync, then rename into place.
A process killed mid-write leaves only a `.tmp-<name>-<pid>-<random>` sibling; the next write of
the same target removes it once that process is gone (each can be a full model copy).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# Leftovers from before temporary names carried a process id (`.tmp-<name>-<8 random chars>`) cannot be
# matched to a writer, so they are removed only when untouched for a day: no write takes that long.
_OLD_STYLE_AGE_S = 86400
_OLD_STYLE = re.compile(r"[a-z0-9_]{8}")
_WITH_PID = re.compile(r"(\d+)-[0-9a-f]{8}")
_MARKERS: dict[Path, str] = {}


MARKER_HEADER = "written by peftkit: `--force` may replace this folder; it wrote these entries:\n"


def marked_entries(marker: Path) -> set[str] | None:
    """The entry names a marker says peftkit wrote next to it; None for a marker from before it listed them."""
    try:
        text = marker.read_text(encoding="utf-8")
    except OSError:
        return None
    if not text.startswith(MARKER_HEADER):
        return None
    return {line for line in text[len(MARKER_HEADER):].splitlines() if line}


def mark_when_written(target: Path, marker: str) -> None:
    """Have the next `atomic_directory(target)` put a small `marker` file in the folder it writes.

    Exports call this (through `prepare_output`) so that peftkit can later tell its own output,
    which `--force` may replace, from a folder it must never delete.
    """
    _MARKERS[Path(target).resolve()] = marker


def _alive(pid: int) -> bool:
    # Process ids are per machine (and per container): a writer on another host sharing this file
    # system looks dead here, so two machines must not write the same target at once.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _remove_leftovers(target: Path) -> None:
    """Remove temporary siblings of `target` left by writers that were killed (`.tmp-` ones, and the `.old-` copy
    a replacement sets aside before deleting it); never a live writer's."""
    prefix, old_prefix = f".tmp-{target.name}-", f".old-{target.name}-"
    with contextlib.suppress(OSError), os.scandir(target.parent) as entries:
        for entry in list(entries):
            if entry.name.startswith(old_prefix) and entry.name[len(old_prefix):].isdigit():
                if not _alive(int(entry.name[len(old_prefix):])):
                    _remove(entry)
                continue
            if not entry.name.startswith(prefix):
                continue
            rest = entry.name[len(prefix):]
            with_pid = _WITH_PID.fullmatch(rest)
            if with_pid:
                stale = not _alive(int(with_pid.group(1)))
            else:
                stale = bool(_OLD_STYLE.fullmatch(rest)) and _age(entry) > _OLD_STYLE_AGE_S
            if stale:
                _remove(entry)


_ANY_TEMPORARY = re.compile(r"\.(?:tmp-.+-(\d+)-[0-9a-f]{8}|old-.+-(\d+))")


def remove_dead_writers_temporaries(folder: Path) -> None:
    """Remove every `.tmp-*` / `.old-*` sibling in `folder` whose writing process is gone (a merge killed with
    -9 leaves a full model copy there), whatever target it was for."""
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in list(entries):
            match = _ANY_TEMPORARY.fullmatch(entry.name)
            if match is not None and not _alive(int(match.group(1) or match.group(2))):
                _remove(entry)


def _remove(entry: os.DirEntry) -> None:
    if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(entry.path)


def _age(entry: os.DirEntry) -> float:
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def nearest_existing(path: Path) -> Path:
    """`path` (made absolute) when it exists, else the closest folder above it that does: where it would be created."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def free_space(path: Path) -> tuple[Path, int] | None:
    """The free bytes on the disk `path` would be written to, with the existing folder they were measured at; None
    on a file system that cannot say (the write itself will tell)."""
    folder = nearest_existing(path)
    try:
        return folder, shutil.disk_usage(folder).free
    except OSError:
        return None


def write_problem(target: Path) -> str | None:
    """Why `target` (a file or folder, and the folders above it that do not exist yet) cannot be written, or None:
    found by creating a file there, not guessed from permissions (a read-only file system, a full disk, another
    user's folder each say so)."""
    parent = nearest_existing(Path(target).expanduser().parent)
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    try:
        probe, fd = _temporary_sibling(parent / Path(target).name,
                                       lambda p: os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"{parent} is not writable ({(exc.strerror or str(exc)).lower()})"
    return None


def _temporary_sibling(target: Path, create: Callable[[Path], T]) -> tuple[Path, T]:
    """Create a new `.tmp-<name>-<pid>-<random>` next to `target` with `create(path)`.

    Unlike tempfile.mkdtemp/mkstemp (always 0700/0600), plain os.mkdir/os.open apply the umask, so the
    output gets the modes any other file gets and a server running as another user can read it.
    """
    _remove_leftovers(target)
    for _ in range(100):
        path = target.with_name(f".tmp-{target.name}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            return path, create(path)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {target}")


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, giving files that a library wrote owner-only (safetensors writes 0600) the
    modes the umask gives any other file."""
    default_mode = 0o666 & ~_umask()
    for path in [*root.rglob("*"), root]:
        if path.is_file() and not path.is_symlink():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077 == 0 and mode | default_mode != mode:
                path.chmod(mode | default_mode)
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
    marker = _MARKERS.pop(target.resolve(), None)
    tmp, _ = _temporary_sibling(target, lambda path: os.mkdir(path, 0o777))
    try:
        yield tmp
        if marker is not None:  # with the names written: anything else found there later is the user's
            written = "".join(f"{p.name}\n" for p in sorted(tmp.iterdir()))
            (tmp / marker).write_text(MARKER_HEADER + written, encoding="utf-8")
        fsync_tree(tmp)
        if target.exists():
            if exist_ok and not replace:
                shutil.rmtree(tmp)
                return
            if not replace:  # it was not there when the block started: another process wrote it meanwhile
                raise FileExistsError(errno.EEXIST, "written meanwhile by another process, so this result was not "
                                      "kept", str(target))
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
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file atomically (temp sibling + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp, fd = _temporary_sibling(path, lambda p: os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        exc.filename = str(path)  # the file asked for, not the temporary name
        raise
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            exc.filename = str(path)  # the file asked for, not the temporary name
        raise
