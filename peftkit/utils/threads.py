"""How many CPU threads torch uses, chosen around other jobs that already keep the cores busy.

On a CPU, torch's threads wait on each other at every operation: one thread held up by another job holds all of them
up. Training on both cores of a 2-core machine next to another busy job ran about 10x slower than on the one core
left free (32-51 s a step against 2.5-4.4 s, same run), so a command that was not told a thread count uses the
cores that are free when it starts, and says so."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CpuLoad:
    load: float
    """The 1-minute load average."""
    cores: int
    others: int | None
    """Threads of other processes that want a core right now; None where the system does not say."""

    def describe(self) -> str:
        now = "" if self.others is None else f", {self.others} other thread{'s' * (self.others != 1)} running now"
        return f"load {self.load:.1f} on {self.cores} cores{now}"


def other_runnable_tasks(samples: int = 5, interval: float = 0.04) -> int | None:
    """Linux: the runnable count of /proc/loadavg less this thread, the median of a few samples (a moment's spike
    is not a busy CPU); None elsewhere."""
    counts = []
    for i in range(samples):
        try:
            runnable = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        except (OSError, IndexError, ValueError):
            return None
        counts.append(max(0, runnable - 1))
        if i + 1 < samples:
            time.sleep(interval)
    return sorted(counts)[len(counts) // 2]


def busy_cpu() -> CpuLoad | None:
    """The CPU's load when other work keeps it busy, else None. Busy means both: a load average that has stayed high
    over the last minute and other threads running at this moment, so a command started right after the previous
    one (whose load is still in the average) is not taken for one beside a busy job."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cores = os.cpu_count() or 1
    if load < 0.75 * cores:
        return None
    others = other_runnable_tasks()
    return None if others == 0 else CpuLoad(load, cores, others)


def omp_threads() -> int | None:
    """OMP_NUM_THREADS where it is set (torch starts with that many threads)."""
    return torch.get_num_threads() if os.environ.get("OMP_NUM_THREADS") else None


def configure_threads(num_threads: int | None) -> int:
    """`num_threads`, else OMP_NUM_THREADS where it is set, else every core; no look at the load (benchmarks compare
    runs with the same count)."""
    threads = num_threads or omp_threads() or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def choose_threads(explicit: int | None, doing: str, setting: str, *, on_cpu: bool = True) -> int:
    """Set torch's thread count for a command that runs a model: the count the user set (`explicit`) as given, with
    a warning when the CPU is busy; without one, every core, or on a busy CPU the cores that are free now (at least
    one), said in a warning that names `setting` to choose otherwise."""
    cores = os.cpu_count() or 1
    busy = busy_cpu() if on_cpu else None
    if explicit:
        threads = explicit
        if busy is not None and (busy.others is None or busy.others + threads > cores):
            advice = "run it alone" if threads == 1 else f"set {setting} to the cores that are free, or run it alone"
            log.warning("The CPU is busy (%s): %s on %d thread%s next to other jobs can run several times slower "
                        "(about 10x measured on 2 cores); %s", busy.describe(), doing, threads, "s" * (threads != 1),
                        advice)
    elif busy is not None and busy.others is not None:
        threads = max(1, cores - busy.others)
        log.warning("The CPU is busy (%s): %s on %d of the %d cores, those free now (on every core next to other jobs "
                    "it can run about 10x slower); set %s to choose the count", busy.describe(), doing, threads, cores,
                    setting)
    else:
        threads = cores
        if busy is not None:  # the system does not say how many others run: only warn
            log.warning("The CPU is busy (%s): %s on every core next to other jobs can run several times slower; set "
                        "%s to the cores that are free, or run it alone", busy.describe(), doing, setting)
    torch.set_num_threads(threads)
    return threads


def choose_run_threads(recipe_threads: int | None, doing: str, *, on_cpu: bool) -> int:
    """A command that runs a trained model (chat, eval, merge, export): OMP_NUM_THREADS where it is set, else the
    run's train.num_threads, else chosen around the load."""
    return choose_threads(omp_threads() or recipe_threads, doing, "OMP_NUM_THREADS (e.g. `OMP_NUM_THREADS=1 peftkit "
                          "...`)", on_cpu=on_cpu)
