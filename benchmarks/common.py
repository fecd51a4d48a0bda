"""Shared helpers for benchmark scripts: environment description, matmul peak, result paths."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_tag() -> str:
    import torch

    device = torch.cuda.get_device_name(0).replace(" ", "-") if torch.cuda.is_available() else f"cpu{os.cpu_count()}"
    return device.lower()


def results_stem(kind: str) -> Path:
    return RESULTS / f"{datetime.date.today().isoformat()}_{machine_tag()}_{kind}"


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Best-of fp32 matmul throughput: the ceiling training FLOP/s are compared against."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def environment() -> str:
    import importlib.metadata as md

    import torch

    versions = ", ".join(
        f"{name} {md.version(name)}" for name in ["torch", "transformers", "peft", "trl", "bitsandbytes", "deepspeed"]
    )
    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.platform()} | {cpu} | {os.cpu_count()} cores | threads {torch.get_num_threads()}\n"
        f"python {platform.python_version()} | {versions}"
    )


def write_csv(stem: Path, rows: list[dict]) -> None:
    """`<stem>.csv` with one column per key of the first row (results directory created)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{stem}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict], columns: list[str]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows)]
