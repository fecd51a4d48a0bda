"""Shared helpers for benchmark scripts: environment description, matmul peak, result paths."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine_tag() -> str:
    import torch

    device = torch.cuda.get_device_name(0).replace(" ", "-") if torch.cuda.is_available() else f"cpu{os.cpu_count()}"
    return device.lower()


def results_stem(kind: str) -> Path:
    return RESULTS / f"{datetime.date.today().isoformat()}_{machine_tag()}_{kind}"


def matmul_peak_gflops(n: int = 2048, repeats: int = 10, dtype: Any = None) -> float:
    """Best-of matmul throughput, by default in the precision training uses here (fp32 on the CPU, bf16 on a GPU
    that has it): the ceiling training FLOP/s are compared against."""
    import torch

    cuda = torch.cuda.is_available()
    if dtype is None:
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    a, b = (torch.randn(n, n, dtype=dtype, device="cuda" if cuda else "cpu") for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def speed_bars(labels: list[str], tokens_per_second: list[float], path: str | Path) -> None:
    """A horizontal bar per run: supervised tokens/s (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.barh(labels, tokens_per_second)
    ax.set_xlabel("supervised tokens / s")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
    """`<stem>.csv` with a column per key of any row, in first-seen order (results directory created)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(f"{stem}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict], columns: list[str]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows)]


def _number(value: str) -> object:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return None if value == "" else value


def earlier_rows(stem: Path, keep_out: list[dict], key: tuple[str, ...]) -> list[dict]:
    """Today's rows from an earlier invocation (except those measured again, matched on `key`),
    so a matrix or sweep can be completed in several runs."""
    path = Path(f"{stem}.csv")
    if not path.is_file():
        return []
    def ident(row: dict) -> tuple[str, ...]:
        return tuple(str(row.get(k, "")) for k in key)

    done = {ident(r) for r in keep_out}
    with open(path, newline="") as handle:
        rows = [{k: (v if k == "run_dir" else _number(v)) for k, v in r.items()} for r in csv.DictReader(handle)]
    return [r for r in rows if ident(r) not in done]


NOTES_HEADING = "\n## Reading the table"
"""Where a report's hand-written notes start: a rewrite of the report keeps them."""


def kept_notes(report: Path) -> str:
    """The hand-written notes section of an existing report, carried over when its table is rewritten."""
    text = report.read_text(encoding="utf-8") if report.is_file() else ""
    return text[text.index(NOTES_HEADING):] if NOTES_HEADING in text else ""


def write_table_report(kind: str, rows: list[dict], key: tuple[str, ...], intro: str, columns: list[str]) -> None:
    """`results/<date>_<machine>_<kind>.{csv,md}`: today's earlier rows (not measured again) + `rows`, as a
    CSV and as `intro` followed by a Markdown table, the environment and the report's kept notes; the Markdown is
    printed too."""
    stem = results_stem(kind)
    rows = earlier_rows(stem, rows, key) + rows
    write_csv(stem, rows)
    text = intro + "\n".join(markdown_table(rows, columns)) + f"\n\n```\n{environment()}\n```\n"
    Path(f"{stem}.md").write_text(text + kept_notes(Path(f"{stem}.md")))
    print(text)


def recipe_with_base_model(recipe_path: str) -> tuple[Any, Any, Any]:
    """The recipe, its tokenizer and its base model (float32 on the CPU, no adapter), for the probes."""
    import torch

    from peftkit.config import load_recipe
    from peftkit.models import load_model, load_tokenizer, resolve_model_ref

    recipe = load_recipe(recipe_path)
    source = resolve_model_ref(recipe.model.name, revision=recipe.model.revision)
    tokenizer = load_tokenizer(recipe.model, source)
    model = load_model(recipe.model, None, device="cpu", dtype=torch.float32, source=source).eval()
    return recipe, tokenizer, model
