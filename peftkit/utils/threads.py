"""How many CPU threads torch uses, chosen around other jobs that already keep the cores busy.

On a CPU, torch's threads wait on each other at every operation: one thread held up by another job holds all of them
up. Training on both cores of a 2-core machine next to another busy job ran about 10x slower than on the one core
left free (32-51 s a step against 2.5-4.4 s, same run), so a command that was not told a thread count uses the
cores that are free when it starts, and says so."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from peftkit.utils.once import in_command, pending

log = logging.getLogger(__name__)

_BUSY_WARNINGS: list[str] = pending([])
"""A command's busy-CPU warning, said when its first model loads (`say_busy_cpu_warning`)."""


def say_busy_cpu_warning() -> None:
    """Say the busy-CPU warning the command's thread choice kept back: the slow work starts now."""
    while _BUSY_WARNINGS:
        log.warning("%s", _BUSY_WARNINGS.pop(0))


def _warn_busy(message: str) -> None:
    """Within a command, kept until a model loads (a refusal before that comes alone, not after a thread warning);
    outside one, said now."""
    if in_command():
        _BUSY_WARNINGS.append(message)
    else:
        log.warning("%s", message)


@dataclass(frozen=True)
class CpuLoad:
    load: float
    """The 1-minute load average."""
    cores: int
    busy: int
    """Cores other work keeps busy: threads of other processes running now, at most the sustained load."""

    def describe(self) -> str:
        kept = "all of them" if self.busy >= self.cores else str(self.busy)
        return f"load {self.load:.1f} on {self.cores} cores, {kept} kept busy by other work now"


def _quota(quota: str, period: str) -> float | None:
    try:
        value, every = int(quota), int(period)
    except ValueError:  # cgroup v2's "max": no quota
        return None
    return value / every if value > 0 and every > 0 else None


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup"), own: Path = Path("/proc/self/cgroup")) -> int | None:
    """The CPUs a cgroup quota allows this process (Docker `--cpus`, Kubernetes limits, systemd CPUQuota), rounded
    up; None without a quota. cgroup v2: the smallest `cpu.max` from this process's own cgroup up to the root (a
    limit may sit on a parent slice); v1: the cpu controller's quota at its mount."""
    quotas = []
    try:
        path = next((line.split("::", 1)[1].strip() for line in own.read_text().splitlines() if line.startswith("0::")),
                    "/")
    except OSError:
        path = "/"
    folder = root / path.lstrip("/")
    for place in [folder, *folder.parents]:
        try:
            quotas.append(_quota(*(place / "cpu.max").read_text().split()[:2]))
        except (OSError, TypeError, ValueError):
            pass
        if place == root:
            break
    try:
        quotas.append(_quota((root / "cpu" / "cpu.cfs_quota_us").read_text().strip(),
                             (root / "cpu" / "cpu.cfs_period_us").read_text().strip()))
    except OSError:
        pass
    limits = [q for q in quotas if q]
    return max(1, math.ceil(min(limits))) if limits else None


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, Slurm and container cpusets), capped by a cgroup
    quota; `os.cpu_count()` counts the whole host."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cpus, limit) if limit else cpus)


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


def busy_cpu(cpus: int | None = None) -> CpuLoad | None:
    """The cores other work keeps busy, when there are any; None when none are or it cannot be told. Busy cores are
    both running other threads now and loaded over the last minute: a command started right after the previous one
    (whose load is still in the average) or beside a moment's spike is not slowed down. Linux only: elsewhere there
    is no count of the threads running now. The counts are the host's, so a process confined to some of its CPUs
    (affinity, a container's quota) cannot tell which are busy and is left alone. `cpus`: `usable_cpus()`, when the
    caller has it already."""
    cores = os.cpu_count() or 1
    if (cpus or usable_cpus()) < cores:
        return None
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    others = other_runnable_tasks()
    if others is None:
        return None
    busy = min(others, math.floor(load))  # a whole core's work over the last minute
    return CpuLoad(load, cores, busy) if busy >= 1 else None


def free_cpus(cpus: int, busy: CpuLoad | None) -> int:
    """The usable CPUs other work does not keep busy now, one at least."""
    return max(1, cpus - (busy.busy if busy else 0))


def omp_threads() -> int | None:
    """OMP_NUM_THREADS where it is set to a count (its first field: `4` or `4,2`); an invalid value, which OpenMP
    ignores, is no setting."""
    text = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value > 0 else None


def choose_threads(explicit: int | None, doing: str, setting: str, *, on_cpu: bool = True) -> int:
    """Set torch's thread count for a command that runs a model: the count the user set (`explicit`) as given, with
    a warning when it collides with other work; without one, the usable CPUs, or on a busy CPU those that are free now
    (at least one), said in a warning that names `setting` to choose otherwise. `on_cpu=False`: no look at the load."""
    cpus = usable_cpus()
    busy = busy_cpu(cpus) if on_cpu else None
    _BUSY_WARNINGS.clear()
    if explicit:
        threads = explicit
        if busy is not None and busy.busy + threads > cpus:
            advice = "run it alone" if threads == 1 else f"set {setting} to the cores that are free, or run it alone"
            _warn_busy(f"The CPU is busy ({busy.describe()}): {doing} on {threads} thread{'s' * (threads != 1)} next "
                       f"to other jobs can run several times slower (about 10x measured on 2 cores); {advice}")
    elif busy is not None:
        threads = free_cpus(cpus, busy)
        where = (f"{threads} of the {cpus} cores, those free now" if busy.busy < cpus else
                 "1 thread, as no core is free now")
        _warn_busy(f"The CPU is busy ({busy.describe()}): {doing} on {where} (on every core next to other jobs it can "
                   f"run about 10x slower); set {setting} to choose the count")
    else:
        threads = cpus
    torch.set_num_threads(threads)
    return threads


def choose_run_threads(recipe_threads: int | None, doing: str, *, on_cpu: bool) -> int:
    """A command that runs a trained model (chat, eval, merge, export): OMP_NUM_THREADS where it is set, else the
    run's train.num_threads, else chosen around the load."""
    from peftkit.utils.command_name import command

    setting = f"OMP_NUM_THREADS (e.g. `OMP_NUM_THREADS=1 {command()} ...`)"  # how such a command is given a count
    return choose_threads(omp_threads() or recipe_threads, doing, setting, on_cpu=on_cpu)
