"""GPU checks: peftkit's CUDA paths run for real on one GPU (bitsandbytes kernels, DeepSpeed, bf16), in a time budget.

    python -m benchmarks.gpu [--budget 480] [--out runs/gpu] [--results DIR] [--only STEP ...] [--set KEY=VALUE ...]
    python -m benchmarks.gpu --report runs/gpu     # results/<date>_<gpu>_gpu.{md,csv,png} from a finished run

Steps run in priority order, each in fresh processes, on the quickstart recipe and the built-in
model: the quality rows (LoRA, QLoRA nf4 / int8, full, DoRA, prefix, partial: `peftkit train`,
LoRA also `peftkit eval` for forgetting), the QLoRA adapter merged into deployable weights and
exported for vLLM (each export verified against the adapter model), DeepSpeed ZeRO-2, ZeRO-3, ZeRO-3
with CPU offload and QLoRA under ZeRO-3 against the same run without DeepSpeed (one epoch each),
and training speed against the transformers `Trainer` + peft reference (default path and `train.packing`).
A step whose estimate no longer fits the budget is skipped and says so, so a lease that ends early still
returns what ran.
Each finished step appends a JSON line to RESULTS/gpu.jsonl and refreshes RESULTS/logs.tar.gz (its
logs and metrics); the runs themselves stay in OUT. RESULTS (default: OUT) holds only those small
files and the report, so it can be a folder a remote machine sends back.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, environment, markdown_table, matmul_peak_gflops, speed_bars, write_csv

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "quickstart"
PEFTKIT = [sys.executable, "-m", "peftkit.cli"]
RESULTS_FILE = "gpu.jsonl"
LOGS = "logs"


class StepFailed(RuntimeError):
    pass


@dataclass
class Context:
    out: Path
    results: Path
    sets: list[str]

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def logs(self) -> Path:
        return self.out / LOGS


def run(cmd: list[str], log: Path, timeout: float) -> str:
    """Run `cmd`, its output kept in `log`; the output, or StepFailed with its end."""
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout, 1))
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        output = f"{exc.stdout or ''}{exc.stderr or ''}"
        log.write_text(f"$ {' '.join(cmd)}\n{output}\n(timed out after {timeout:.0f} s)\n")
        raise StepFailed(f"timed out after {timeout:.0f} s") from None
    log.write_text(f"$ {' '.join(cmd)}\n{output}")
    if proc.returncode != 0:
        raise StepFailed(f"exit {proc.returncode}: {output[-1500:]}")
    return output


# --------------------------------------------------------------------------------------------------
# Steps


def environment_step(ctx: Context, timeout: float) -> dict[str, Any]:
    """The GPU, the versions, and the matmul ceilings the training FLOP/s are read against."""
    import torch

    if not torch.cuda.is_available():
        raise StepFailed("no CUDA GPU visible")
    props = torch.cuda.get_device_properties(0)
    bf16 = round(matmul_peak_gflops(8192, dtype=torch.bfloat16) / 1000, 1)
    torch.backends.cuda.matmul.allow_tf32 = False
    fp32 = round(matmul_peak_gflops(4096, dtype=torch.float32) / 1000, 1)
    import bitsandbytes

    return {"gpu": props.name, "capability": f"{props.major}.{props.minor}", "memory_gb": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda, "bf16_matmul_tflops": bf16, "fp32_matmul_tflops": fp32,
            "bitsandbytes_backend": str(getattr(bitsandbytes.cextension, "BNB_BACKEND", "")), "versions": environment()}


def summary_row(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    keys = ["trainable_params", "trainable_share", "tokens_per_second", "train_seconds", "peak_memory_mb", "eval_loss_before",
            "eval_loss_after", "heldout_accuracy_before", "heldout_accuracy_after", "device", "dtype"]
    return {key: summary.get(key) for key in keys}


def keep_run_files(ctx: Context, run_dir: Path, name: str) -> None:
    for file in ("metrics.jsonl", "summary.json", "eval.json", "deepspeed.json"):
        if (run_dir / file).is_file():
            shutil.copy(run_dir / file, ctx.logs / f"{name}.{file}")


def method_step(method: str, evaluate: bool) -> Callable[[Context, float], dict[str, Any]]:
    """`peftkit train` of the quickstart recipe with `method`'s settings (benchmarks.methods), then `peftkit eval`."""

    def step(ctx: Context, timeout: float) -> dict[str, Any]:
        from benchmarks.methods import recipe_for

        recipe, overrides = recipe_for(RECIPE, method)
        run_dir = ctx.runs / method
        started = time.perf_counter()
        run([*PEFTKIT, "train", str(recipe), *overrides, *ctx.sets, f"output_dir={run_dir}", "--force"],
            ctx.logs / f"{method}.train.log", timeout)
        row = {"method": method, **summary_row(run_dir)}
        if evaluate:
            run([*PEFTKIT, "eval", str(run_dir)], ctx.logs / f"{method}.eval.log", timeout - (time.perf_counter() - started))
            report = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
            row.update(general_accuracy_before=report["before"].get("general_accuracy"),
                       general_accuracy_after=report["after"].get("general_accuracy"),
                       forgetting_points=report.get("forgetting_points"))
        keep_run_files(ctx, run_dir, method)
        return row

    return step


def export_step(ctx: Context, timeout: float) -> dict[str, Any]:
    """The QLoRA run merged into full weights (dequantized base) and exported adapter-only: each export verified."""
    run_dir = ctx.runs / "qlora"
    if not (run_dir / "summary.json").is_file():
        raise StepFailed("needs the qlora step's run")
    row: dict[str, Any] = {}
    for fmt in ("hf", "adapter"):
        started = time.perf_counter()
        output = run([*PEFTKIT, "export", str(run_dir), "--format", fmt, "--out", str(ctx.runs / f"qlora-{fmt}"), "--force"],
                     ctx.logs / f"export-qlora-{fmt}.log", timeout)
        row[f"{fmt}_seconds"] = round(time.perf_counter() - started, 1)
        row[f"{fmt}_verification"] = next((line.strip() for line in output.splitlines() if "verif" in line.lower()), "")
    return row


def deepspeed_step(name: str, overrides: list[str], method: str = "lora") -> Callable[[Context, float], dict[str, Any]]:
    """One epoch of `method` on the quickstart recipe with `overrides` (a DeepSpeed setting, or none: the control)."""

    def step(ctx: Context, timeout: float) -> dict[str, Any]:
        from benchmarks.methods import recipe_for

        recipe, method_overrides = recipe_for(RECIPE, method)
        run_dir = ctx.runs / name
        # No held-out generation: under ZeRO-3 every decoding step gathers the weights (slow, and not what is checked).
        run([*PEFTKIT, "train", str(recipe), *method_overrides, *ctx.sets, "train.epochs=1", "data.heldout=null", *overrides,
             f"output_dir={run_dir}", "--force"], ctx.logs / f"{name}.train.log", timeout)
        keep_run_files(ctx, run_dir, name)
        config = json.loads((run_dir / "deepspeed.json").read_text(encoding="utf-8")) if (run_dir / "deepspeed.json").is_file() else None
        zero = (config or {}).get("zero_optimization", {})
        return {"run": name, "method": method, "zero_stage": zero.get("stage"),
                "offload": ",".join(k.removeprefix("offload_") for k in ("offload_optimizer", "offload_param")
                                    if zero.get(k, {}).get("device", "none") != "none"),
                **summary_row(run_dir)}

    return step


def speed_step(variant: str) -> Callable[[Context, float], dict[str, Any]]:
    """One epoch through benchmarks.speed_worker: the transformers Trainer + peft reference, or peftkit's trainer."""

    def step(ctx: Context, timeout: float) -> dict[str, Any]:
        out = ctx.runs / f"speed-{variant}"
        output = run([sys.executable, "-m", "benchmarks.speed_worker", "--recipe", f"recipes/{RECIPE}.yaml",
                      "--variant", variant, "--epochs", "1", "--out", str(out)], ctx.logs / f"speed-{variant}.log", timeout)
        return json.loads(next(line for line in reversed(output.splitlines()) if line.startswith("{")))  # its last JSON line

    return step


# name -> (estimated seconds on one H200, the step); in the order they run.
STEPS: dict[str, tuple[float, Callable[[Context, float], dict[str, Any]]]] = {
    "env": (15, environment_step),
    "lora": (90, method_step("lora", evaluate=True)),
    "qlora": (70, method_step("qlora", evaluate=False)),
    "export-qlora": (40, export_step),
    "zero2": (45, deepspeed_step("zero2", ["deepspeed.stage=2"])),
    "zero3": (50, deepspeed_step("zero3", ["deepspeed.stage=3"])),
    "lora-1ep": (35, deepspeed_step("lora-1ep", [])),
    "zero3-offload": (70, deepspeed_step("zero3-offload", ["deepspeed.stage=3", "deepspeed.offload_optimizer=cpu",
                                                           "deepspeed.offload_params=cpu"])),
    "zero3-qlora": (60, deepspeed_step("zero3-qlora", ["deepspeed.stage=3"], method="qlora")),
    "qlora-int8": (60, method_step("qlora-int8", evaluate=False)),
    "speed-reference": (40, speed_step("reference")),
    "speed-peftkit": (40, speed_step("peftkit")),
    "speed-packed": (40, speed_step("peftkit-packed")),
    "full": (50, method_step("full", evaluate=False)),
    "dora": (60, method_step("dora", evaluate=False)),
    "prefix": (40, method_step("prefix", evaluate=False)),
    "partial": (40, method_step("partial", evaluate=False)),
}


def run_steps(ctx: Context, names: list[str], budget: float) -> list[dict[str, Any]]:
    started = time.perf_counter()
    ctx.logs.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        estimate, step = STEPS[name]
        left = budget - (time.perf_counter() - started)
        record: dict[str, Any] = {"step": name}
        if estimate > left:
            record.update(status="skipped", reason=f"estimate {estimate:.0f} s, {left:.0f} s of the budget left")
        else:
            print(f"[{time.perf_counter() - started:6.0f} s] {name} ...", file=sys.stderr, flush=True)
            step_started = time.perf_counter()
            try:
                record.update(status="ok", result=step(ctx, left))
            except Exception as exc:  # a failed step is a result too; the next ones still run
                record.update(status="failed", error=str(exc)[-2000:])
            record["seconds"] = round(time.perf_counter() - step_started, 1)
        print(json.dumps(record), file=sys.stderr, flush=True)
        with open(ctx.results / RESULTS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        with tarfile.open(ctx.results / "logs.tar.gz", "w:gz") as tar:
            tar.add(ctx.logs, arcname=LOGS)
        results.append(record)
    return results


# --------------------------------------------------------------------------------------------------
# Report


def read_results(folder: Path) -> dict[str, dict[str, Any]]:
    if not (folder / LOGS).is_dir() and (folder / "logs.tar.gz").is_file():
        with tarfile.open(folder / "logs.tar.gz") as tar:
            tar.extractall(folder, filter="data")
    records = [json.loads(line) for line in (folder / RESULTS_FILE).read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["step"]: r for r in records}


def percent(value: Any) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def rounded(value: Any, digits: int = 4) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def report(folder: Path, stem: Path) -> Path:
    """Markdown + CSV + PNG (loss curves, tokens/s) for a finished `benchmarks.gpu` run in `folder`."""
    results = read_results(folder)
    ok = {name: r["result"] for name, r in results.items() if r["status"] == "ok"}
    env = ok.get("env", {})
    lines = [f"# GPU checks on {env.get('gpu', 'a GPU')}: quickstart recipe, built-in SmolLM2-135M-Instruct", "",
             "`python -m benchmarks.gpu` (what each step runs: the module docstring). bf16 autocast on the GPU, "
             "seeds and data as the CPU reports. Peak memory is the GPU's (`torch.cuda.max_memory_allocated`).", "",
             "| step | status | seconds | note |", "|---|---|---|---|"]
    for name, r in results.items():
        note = r.get("reason") or (r.get("error", "").splitlines() or [""])[-1][:160]
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', '')} | {note} |")
    methods = [dict(r, method=name) for name, r in ok.items() if "heldout_accuracy_after" in r and "run" not in r]
    rows = []
    if methods:
        lines += ["", "## Methods (5 epochs, as `recipes/quickstart*.yaml`)", ""]
        for r in methods:
            rows.append({"method": r["method"], "trainable_%": f"{100 * (r['trainable_share'] or 0):.3f}",
                         "held-out before %": percent(r["heldout_accuracy_before"]), "held-out after %": percent(r["heldout_accuracy_after"]),
                         "eval loss": rounded(r["eval_loss_after"]), "forgetting points": r.get("forgetting_points", ""),
                         "tokens/s": r["tokens_per_second"], "train s": r["train_seconds"], "peak GPU MB": r["peak_memory_mb"]})
        lines += markdown_table(rows, list(rows[0]))
    zero = [r for r in ok.values() if "run" in r]
    if zero:
        lines += ["", "## DeepSpeed on one GPU (1 epoch; `lora-1ep` is the same run without DeepSpeed)", ""]
        table = [{"run": r["run"], "method": r["method"], "ZeRO stage": r["zero_stage"] or "-", "offload": r["offload"] or "-",
                  "eval loss": rounded(r["eval_loss_after"]), "tokens/s": r["tokens_per_second"], "train s": r["train_seconds"],
                  "peak GPU MB": r["peak_memory_mb"]} for r in zero]
        lines += markdown_table(table, list(table[0]))
    if "export-qlora" in ok:
        lines += ["", "## QLoRA export", "", *(f"- `{k}`: {v}" for k, v in ok["export-qlora"].items())]
    speed = [ok[n] for n in ("speed-reference", "speed-peftkit", "speed-packed") if n in ok]
    if speed:
        reference = ok.get("speed-reference")
        for r in speed:
            r["speedup_vs_reference"] = round(r["supervised_tokens_per_second"] / reference["supervised_tokens_per_second"], 2) if reference else ""
        lines += ["", "## Speed: peftkit vs transformers Trainer + peft (1 epoch, LoRA, same batches)", "",
                  *markdown_table(speed, ["variant", "train_seconds", "supervised_tokens_per_second", "speedup_vs_reference",
                                          "eval_loss", "peak_gpu_mb", "dtype"])]
    if env:
        lines += ["", "## Environment", "", f"{env['gpu']} (compute capability {env['capability']}, {env['memory_gb']} GiB), "
                  f"CUDA {env['cuda']}; measured matmul peak {env['bf16_matmul_tflops']} TFLOP/s bf16 (8192^3), "
                  f"{env['fp32_matmul_tflops']} TFLOP/s fp32 without TF32 (4096^3).", "", "```", env["versions"], "```"]
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_csv(stem, [{"step": n, "status": r["status"], "seconds": r.get("seconds"),
                      **{k: v for k, v in r.get("result", {}).items() if not isinstance(v, (dict, list)) and k != "versions"}}
                     for n, r in results.items()])
    plot(folder, ok, stem)
    lines += ["", f"Plots: `{stem.name}_loss.png` (train loss per run), `{stem.name}_speed.png` (tokens/s per run)."]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    return Path(f"{stem}.md")


def plot(folder: Path, ok: dict[str, dict[str, Any]], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for metrics in sorted((folder / LOGS).glob("*.metrics.jsonl")):
        points = [(m["step"], m["loss"]) for m in map(json.loads, metrics.read_text(encoding="utf-8").splitlines()) if "loss" in m]
        if points:
            ax.plot(*zip(*points), label=metrics.name.removesuffix(".metrics.jsonl"))
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(f"{stem}_loss.png")
    plt.close(fig)
    speeds = {name: r.get("tokens_per_second") or r.get("supervised_tokens_per_second") for name, r in ok.items()}
    speeds = {name: value for name, value in speeds.items() if value}
    speed_bars(list(speeds), list(speeds.values()), f"{stem}_speed.png")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=480, help="seconds for all steps (default 480)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "gpu"), help="run directories and logs")
    parser.add_argument("--results", help="gpu.jsonl, logs.tar.gz and the report (default: --out)")
    parser.add_argument("--only", nargs="*", choices=list(STEPS), help="these steps only (default: all, in order)")
    parser.add_argument("--set", nargs="*", default=[], dest="sets", help="overrides applied to every training run")
    parser.add_argument("--report", metavar="DIR", help="write the report of a finished run in DIR to benchmarks/results")
    parser.add_argument("--stem", help="with --report: results file stem (default <date>_<gpu>_gpu)")
    args = parser.parse_args()
    if args.report:
        folder = Path(args.report)
        gpu = read_results(folder).get("env", {}).get("result", {}).get("gpu", "gpu")
        stem = Path(args.stem) if args.stem else RESULTS / f"{time.strftime('%Y-%m-%d')}_{gpu.lower().replace(' ', '-')}_gpu"
        print(f"wrote {report(folder, stem)}")
        return
    out = Path(args.out)
    results = Path(args.results) if args.results else out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    results.mkdir(parents=True, exist_ok=True)
    (results / RESULTS_FILE).unlink(missing_ok=True)
    run_steps(Context(out, results, args.sets), args.only or list(STEPS), args.budget)
    print(f"wrote {report(results, results / 'gpu')}", file=sys.stderr)


if __name__ == "__main__":
    main()
