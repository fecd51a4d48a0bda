"""Advisory file locks that never wait: a second process is told who holds the lock instead of hanging.

The holder writes "pid N, since TIME" into the lock file; the OS drops the lock when the holder ends, killed or not.
"""

from __future__ import annotations

import os
import time
from typing import IO


def lock_now(handle: IO[str], *, shared: bool = False) -> str | None:
    """Lock `handle`'s file without waiting: None when locked, else what its holder wrote there ("" for shared
    holders, which write nothing)."""
    import fcntl

    try:
        fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        return handle.read().strip()
    return None


def write_holder(handle: IO[str]) -> None:
    """Say in the (exclusively held) lock file who holds it."""
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
