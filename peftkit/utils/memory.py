"""The process's own peak resident memory, for run summaries and the benchmarks."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB.

    Read from /proc's VmHWM where there is one: it belongs to this process's own address space. getrusage's
    ru_maxrss does not: a child forked from a large process starts at its parent's RSS (Linux keeps the mark across
    fork and exec), so a worker spawned by a 3 GB test runner or launcher would report at least 3 GB.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS counts bytes, Linux KiB
