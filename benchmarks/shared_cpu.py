"""Two trainings that overlap on one CPU: every core each (a count set by hand, what peftkit did before it looked at
the load) against the thread count `peftkit train` chooses when it starts beside the first one.

    python -m benchmarks.shared_cpu [--recipe recipes/quickstart.yaml] [--steps 16] [--offset 25]

Run A starts, run B starts `--offset` seconds later; each trains `--steps` steps of the recipe (no evaluation before,
no held-out generation). Variant `all-cores` sets `train.num_threads` to every usable CPU for both; variant `chosen`
sets nothing (A finds an idle CPU and takes every core; B finds A running and takes the cores left). The variants run
one after another, `chosen` first. Writes benchmarks/results/<date>_<machine>_shared_cpu.{md,csv}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import environment, markdown_table, results_stem, write_csv

ROOT = Path(__file__).resolve().parents[1]


def _start(recipe: str, steps: int, out: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "peftkit", "train", recipe, f"train.max_steps={steps}", "eval.before=false",
           "data.heldout=null", f"output_dir={out}", *extra, "--force"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(f"{out}.log", "w"))  # noqa: SIM115


def run_pair(recipe: str, steps: int, offset: float, variant: str, folder: Path) -> list[dict]:
    from peftkit.utils.threads import usable_cpus

    extra = [f"train.num_threads={usable_cpus()}"] if variant == "all-cores" else []
    started = time.perf_counter()
    processes = {"A": _start(recipe, steps, folder / f"{variant}-A", extra)}
    try:
        time.sleep(offset)
        processes["B"] = _start(recipe, steps, folder / f"{variant}-B", extra)
        failed = next((name for name, process in processes.items() if process.wait() != 0), None)
    finally:  # a failure or Ctrl-C here leaves no training behind
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
                process.wait()
    if failed:  # the folder is a temporary one: say what the log said
        log = (folder / f"{variant}-{failed}.log").read_text(errors="replace").strip().splitlines()
        raise SystemExit(f"run {variant}-{failed} failed:\n" + "\n".join(log[-15:]))
    rows = []
    for name in processes:
        summary = json.loads((folder / f"{variant}-{name}" / "summary.json").read_text(encoding="utf-8"))
        rows.append({"variant": variant, "run": name, "threads": summary["threads"],
                     "train_seconds": summary["train_seconds"], "tokens_per_second": summary["tokens_per_second"],
                     "busy_warning": "The CPU is busy" in (folder / f"{variant}-{name}.log").read_text(encoding="utf-8")})
    print(f"{variant}: both done after {time.perf_counter() - started:.0f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/quickstart.yaml", help="default: %(default)s")
    parser.add_argument("--steps", type=int, default=16, help="training steps per run (default: %(default)s)")
    parser.add_argument("--offset", type=float, default=25.0, help="seconds between the two starts (default: %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="peftkit-shared-cpu-") as tmp:
        rows = [row for variant in ("chosen", "all-cores") for row in run_pair(args.recipe, args.steps, args.offset,
                                                                                  variant, Path(tmp))]
    stem = results_stem("shared_cpu")
    write_csv(stem, rows)
    lines = ["# Two trainings overlapping on one CPU: the thread count peftkit chooses against every core each", "",
             f"Recipe `{args.recipe}`, {args.steps} steps per run, the second run started {args.offset:.0f} s after the "
             "first. `all-cores`: `train.num_threads` set to every usable CPU for both runs; `chosen`: no setting, "
             "each run takes the cores free when it starts. `train_seconds` and `tokens_per_second` from each run's "
             "summary (supervised tokens per second of training).", "",
             f"`python -m benchmarks.shared_cpu --recipe {args.recipe} --steps {args.steps} --offset {args.offset:g}`",
             "", *markdown_table(rows, ["variant", "run", "threads", "train_seconds", "tokens_per_second",
                                        "busy_warning"]), "", environment()]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md and .csv")


if __name__ == "__main__":
    main()
