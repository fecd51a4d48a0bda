"""Method comparison: each adapter method trained on the same data, then `peftkit eval`.

    python -m benchmarks.methods [--recipes quickstart] [--methods lora qlora ...] [--set train.epochs=3] [--seeds 1 2]

For a recipe `NAME`, method `M` uses `recipes/NAME-M.yaml` when it exists (its tuned settings),
else `recipes/NAME.yaml` (its data) with the adapter/train settings of `recipes/quickstart-M.yaml`
(LoRA variants: the recipe's own LoRA settings with `use_dora` / `method: qlora`). Each run is a fresh `peftkit train` process
(clean peak RSS), run one after another. Writes benchmarks/results/<date>_<machine>_methods.{md,csv}
and PNG plots (loss curves, accuracy vs trainable share, tokens/s). With `--seeds`, each run is
repeated with `train.seed` set (which also redraws the eval split, LoRA init and dropout) and the
report adds mean and spread per recipe x method: single runs differ by a few questions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from benchmarks.common import earlier_rows, environment, kept_notes, markdown_table, results_stem, speed_bars, write_csv
from peftkit.evaluate.run_eval import ORIGINAL_BASE_REPORT, REPORT

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["lora", "qlora", "qlora-loftq", "full", "lora-replay", "dora", "qlora-int8", "prefix", "partial"]
LLAMA_MLP_TARGETS = 'adapter.target_modules=["gate_proj","up_proj","down_proj"]'  # SmolLM2 / Llama MLP names
TRAIN_FILE = "{train}"
"""In a variant's override: the recipe's own `data.train` file (absolute path)."""
# Methods that are a variant of another recipe rather than a recipe of their own.
VARIANT_OVERRIDES = {
    "qlora-int8": ("qlora", ["quantization.bits=8"]),
    "qlora-loftq": ("qlora", ["adapter.init=loftq"]),  # nf4 with the adapter started at the quantization error
    # nf4 except the value projections: 3 % of SmolLM2's linear weights, half of nf4's KL from fp32
    # (benchmarks/quant_error.py).
    "qlora-keep-v": ("qlora", ['quantization.keep_modules=["v_proj"]']),
    "qlora-bs32": ("qlora", ["quantization.blocksize=32"]),  # nf4 in blocks of 32: half the KL from fp32
    "qlora-nogc": ("qlora", ["adapter.gradient_checkpointing=false"]),
    # quickstart-qlora.yaml trains r64 / alpha 128 (the 4-bit error needs the capacity); on the other
    # recipes `qlora` takes the recipe's LoRA rank (16), so `qlora-r64` is the recommended setting there.
    # `qlora-r16` reproduces the quickstart `qlora` rows measured before the recipe moved to r64.
    "qlora-r64": ("qlora", ["adapter.r=64", "adapter.alpha=128"]),
    "qlora-r16": ("qlora", ["adapter.r=16", "adapter.alpha=32"]),
    "lora-gc": ("lora", ["train.gradient_checkpointing=true"]),
    "lora-r64": ("lora", ["adapter.r=64", "adapter.alpha=128"]),  # the control for qlora-r64
    # LoRA with the built-in general replay set mixed in (data.replay defaults: ratio 0.2, the base
    # model's own answers), to show its effect on forgetting.
    "lora-replay": ("lora", ["data.replay.path=builtin:general"]),
    "lora-replay-distill": ("lora", ["data.replay.path=builtin:general", "data.replay.distill=true"]),
    # One replay row per domain row, trained towards the base distribution: the strongest pull back.
    "lora-replay1-distill": ("lora", ["data.replay.path=builtin:general", "data.replay.ratio=1.0",
                                      "data.replay.distill=true"]),
    # (`lora-replay1-distill-bucket`, the same recipe with the teacher's mass outside its top 20 as one more target
    # bucket instead of renormalised away, lived in commit 72c9dcd: same forgetting, fewer facts, 1.15x the time.)
    # Distilled replay 1.0 on a rank-8 adapter: half the update's capacity ("LoRA learns less and forgets less").
    "lora-r8-replay1-distill": ("lora", ["adapter.r=8", "adapter.alpha=16", "data.replay.path=builtin:general",
                                         "data.replay.ratio=1.0", "data.replay.distill=true"]),
    # (`lora-replay2-distill-cut64`, ratio 2.0 with replay answers cut after 64 tokens, lived in commit
    # f44963f: measured worse.)
    # (`lora-replay1-distill-resample`, new replay rows every epoch, lived in commit 476c604: measured worse.)
    # Distilled replay 1.0 of the prompts the base model answers in agreement with the written answer only.
    "lora-replay1-distill-known": ("lora", ["data.replay.path=builtin:general", "data.replay.ratio=1.0",
                                            "data.replay.distill=true", "data.replay.known_only=true"]),
    # (`lora-replay1-distill-vocab60`, distilled replay 1.0 plus 60 prompts about the domain's 20 most frequent
    # words, `data.replay.domain_prompts`, lived in commit d3d17d1: within the seed spread at 1.5x the time.)
    # (`lora-replay1-onpolicy`, `data.replay.on_policy`: from the second epoch on the replay prompts answered by the
    # model in training, 64 tokens, and scored by the base model with the adapter off, top-20 + rest bucket; lived
    # in commit 626c2a2: the same forgetting on seeds 1 / 2, fewer facts, 1.35-1.5x the time.)
    # LoRA on the MLP projections only / on the attention projections only ("LoRA learns less and
    # forgets less": which half of the blocks carries the forgetting).
    "lora-mlp": ("lora", [LLAMA_MLP_TARGETS]),
    "lora-attn": ("lora", ['adapter.target_modules=["q_proj","k_proj","v_proj","o_proj"]']),
    # Only the upper / lower half of SmolLM2-135M's 30 decoder layers ("spurious forgetting", Zheng et al., 2025:
    # much of what fine-tuning forgets is undone in the lowest layers).
    "lora-top": ("lora", ["adapter.layers=[15,29]"]),
    "lora-bottom": ("lora", ["adapter.layers=[0,14]"]),
    # The domain's own training prompts asked WITHOUT its system prompt, answered (distilled) by the base model
    # (`data.replay.contrast`): alone (a replay file of the training prompts themselves, no general replay),
    # and on top of `quickstart-replay.yaml`'s distilled general replay.
    "lora-contrast": ("lora", [f"data.replay.path={TRAIN_FILE}",
                               "data.replay.answers=base", "data.replay.ratio=1.0", "data.replay.distill=true"]),
    "lora-replay1-distill-contrast": ("lora", ["data.replay.path=builtin:general", "data.replay.ratio=1.0",
                                               "data.replay.distill=true", "data.replay.contrast=true"]),
    # `quickstart-replay.yaml` (distilled replay 1.0) on the MLP projections only.
    "lora-mlp-replay1-distill": ("lora", [LLAMA_MLP_TARGETS, "data.replay.path=builtin:general",
                                          "data.replay.ratio=1.0", "data.replay.distill=true"]),
    # One replay row per domain row with the set's written answers (classic replay of old data), hard targets.
    "lora-replay1-written": ("lora", ["data.replay.path=builtin:general", "data.replay.ratio=1.0",
                                      "data.replay.answers=dataset"]),
    # CorDA knowledge-preserved init (peft): the adapter starts in the directions the general set uses
    # least, here with distilled replay (ratio 0.2).
    "lora-corda-kpm-replay-distill": ("lora", ["adapter.init=corda_kpm", "data.replay.path=builtin:general",
                                               "data.replay.distill=true"]),
}


# `qlora@original`: the `qlora` run (trained if missing), its adapter evaluated on the unquantized
# weights (`peftkit eval --qlora-base original`), as vLLM multi-LoRA serves it on the original model.
ORIGINAL_BASE = "@original"

# LoRA-family methods run on a recipe's own LoRA settings; the others take their method settings
# (adapter, train, quantization sections) from the quickstart recipe of that method.
LORA_FAMILY = {"lora": [], "dora": ["adapter.use_dora=true"], "qlora": ["adapter.method=qlora"]}
ROW_KEY = ("recipe", "method", "seed")
METHOD_SECTIONS = ("adapter", "train", "quantization")


def recipe_for(name: str, method: str) -> tuple[Path, list[str]]:
    """(recipe file, overrides) for `method` on recipe `name`'s data."""
    base_method, extra = VARIANT_OVERRIDES.get(method, (method, []))
    dedicated = ROOT / "recipes" / f"{name}-{base_method}.yaml"
    if dedicated.is_file():
        return dedicated, _with_train_file(dedicated, extra)
    recipe = ROOT / "recipes" / f"{name}.yaml"
    if not recipe.is_file():
        raise SystemExit(f"no recipes/{name}.yaml for --recipes {name} (give a recipe's name without .yaml)")
    extra = _with_train_file(recipe, extra)
    if base_method in LORA_FAMILY:
        return recipe, [*LORA_FAMILY[base_method], *extra]
    template = ROOT / "recipes" / f"quickstart-{base_method}.yaml"
    if not template.is_file():
        raise SystemExit(f"no recipes/{name}-{base_method}.yaml or recipes/quickstart-{base_method}.yaml for {method}")
    sections = yaml.safe_load(template.read_text(encoding="utf-8"))
    return recipe, [*(f"{key}={json.dumps(sections[key])}" for key in METHOD_SECTIONS if key in sections), *extra]


def _with_train_file(recipe: Path, overrides: list[str]) -> list[str]:
    if not any(TRAIN_FILE in o for o in overrides):
        return overrides
    train = (recipe.parent / yaml.safe_load(recipe.read_text(encoding="utf-8"))["data"]["train"]).resolve()
    return [o.replace(TRAIN_FILE, str(train)) for o in overrides]


def run(cmd: list[str], timeout: int = 5400) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


PEFTKIT = [sys.executable, "-m", "peftkit.cli"]


def train_run(recipe: Path, overrides: list[str], run_dir: Path) -> dict:
    """`peftkit train` in a fresh process (clean peak RSS); returns the run's summary.json."""
    run([*PEFTKIT, "train", str(recipe), *overrides, f"output_dir={run_dir}", "--force"])
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))


def measure(name: str, method: str, sets: list[str], out_root: Path, *, retrain: bool = True,
            reuse_eval: bool = False, seed: int | None = None) -> dict:
    """Train (unless `retrain` is off and the run exists) and `peftkit eval` one recipe x method (x seed)."""
    trained, original_base = method.removesuffix(ORIGINAL_BASE), method.endswith(ORIGINAL_BASE)
    recipe, overrides = recipe_for(name, trained)
    run_dir = out_root / (f"{name}-{trained}" if seed is None else f"{name}-{trained}-seed{seed}")
    if (retrain and not original_base) or not (run_dir / "summary.json").is_file():
        train_run(recipe, [*overrides, *sets, *([f"train.seed={seed}"] if seed is not None else [])], run_dir)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    used_seed = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))["train"]["seed"]
    eval_file = run_dir / (ORIGINAL_BASE_REPORT if original_base else REPORT)
    if retrain or not reuse_eval or not eval_file.is_file():
        run([*PEFTKIT, "eval", str(run_dir), *(["--qlora-base", "original"] if original_base else [])])
    report = json.loads(eval_file.read_text(encoding="utf-8"))
    if original_base:  # the training summary measured the adapter on the quantized base: take the eval's
        summary = {**summary, "eval_loss_after": report["after"].get("loss"),
                   "heldout_accuracy_after": report["after"].get("heldout_accuracy"),
                   "heldout_accuracy_before": report["before"].get("heldout_accuracy")}
    return {
        "recipe": name,
        "method": method,
        "seed": used_seed,
        "trainable_params": summary["trainable_params"],
        "trainable_share": round(summary["trainable_share"], 5),
        "peak_rss_mb": summary["peak_memory_mb"],
        "tokens_per_second": summary["tokens_per_second"],
        "train_seconds": summary["train_seconds"],
        "eval_loss": round(summary["eval_loss_after"], 4) if summary["eval_loss_after"] is not None else None,
        "heldout_accuracy": summary["heldout_accuracy_after"],
        "heldout_accuracy_base": summary["heldout_accuracy_before"],
        "general_accuracy": report["after"].get("general_accuracy"),
        "forgetting_points": report["forgetting_points"],
        "forgetting_in_role_points": report.get("forgetting_in_role_points"),
        "forgetting_confident_points": report.get("forgetting_confident_points"),
        "overrides": " ".join(sets),  # rows of several invocations are merged into one report: each says its own
        "run_dir": str(run_dir),
    }


def curve_key(row: dict) -> str:
    return f"{row['recipe']}/{row['method']}/{row.get('seed')}"


def update_curves(rows: list[dict], path: Path) -> dict[str, list[list[float]]]:
    """Train-loss curves of every reported run, kept in results beside the CSV: run directories are
    scratch (runs/ is not committed), so a report redrawn later still has the curves of earlier runs."""
    from peftkit.train.callbacks import read_metrics
    from peftkit.utils.atomic import atomic_write_text

    curves = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for row in rows:
        metrics_file = Path(row["run_dir"]) / "metrics.jsonl"
        if metrics_file.is_file():
            points = [[m["step"], m["loss"]] for m in read_metrics(metrics_file) if "loss" in m]
            if points:
                curves[curve_key(row)] = points
    lines = [f"{json.dumps(key)}: {json.dumps(curves[key])}" for key in sorted(curves)]  # a run per line
    atomic_write_text(path, "{\n" + ",\n".join(lines) + "\n}\n")
    return curves


def plots(rows: list[dict], stem: Path, curves: dict[str, list[list[float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs_of: dict[tuple[str, str], int] = {}
    for row in rows:
        runs_of[(row["recipe"], row["method"])] = runs_of.get((row["recipe"], row["method"]), 0) + 1
    recipes = list(dict.fromkeys(row["recipe"] for row in rows))  # one panel per recipe
    columns = min(len(recipes), 3)
    panels = -(-len(recipes) // columns)
    fig, axes = plt.subplots(panels, columns, figsize=(5 * columns, 3.6 * panels), dpi=110, squeeze=False)
    for ax, recipe in zip(axes.flat, recipes):
        for row in (r for r in rows if r["recipe"] == recipe):
            points = curves.get(curve_key(row), [])
            seed = f" (seed {row.get('seed')})" if runs_of[(row["recipe"], row["method"])] > 1 else ""
            if points:
                ax.plot(*zip(*points), label=f"{row['method']}{seed}")
        ax.set_title(recipe, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(recipes):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(f"{stem}_loss.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for recipe in recipes:
        mine = [r for r in rows if r["recipe"] == recipe and r["heldout_accuracy"] is not None]
        ax.scatter([r["trainable_share"] * 100 for r in mine], [r["heldout_accuracy"] * 100 for r in mine], label=recipe, s=18)
        for row in mine:
            ax.annotate(row["method"], (row["trainable_share"] * 100, row["heldout_accuracy"] * 100), fontsize=6)
    ax.legend(fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of model, log)")
    ax.set_ylabel("held-out fact accuracy (%)")
    fig.tight_layout()
    fig.savefig(f"{stem}_accuracy.png")
    plt.close(fig)
    speed_bars([f"{r['recipe']}/{r['method']}" for r in rows], [r["tokens_per_second"] or 0 for r in rows], f"{stem}_speed.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["quickstart"],
                        help="recipe names under recipes/ whose data each method trains on (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", default=METHODS,
                        help=f"methods or variants (VARIANT_OVERRIDES in this file; default: {' '.join(METHODS)})")
    parser.add_argument("--set", nargs="*", default=[], dest="sets", help="overrides applied to every run")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"), help="where the runs go (default: runs/bench)")
    parser.add_argument("--eval-only", action="store_true", help="re-evaluate existing runs instead of training again")
    parser.add_argument("--collect", action="store_true", help="report existing runs and their eval.json as they are")
    parser.add_argument("--seeds", nargs="*", type=int, default=[None],
                        help="train.seed values to repeat each run with (default: the recipe's seed, one run)")
    args = parser.parse_args()
    for name in args.recipes:  # an unknown recipe or method stops here, not after hours of the ones before it
        for method in args.methods:
            recipe_for(name, method)
    rows: list[dict] = []
    for name in args.recipes:
        for method in args.methods:
            for seed in args.seeds:
                print(f"{name}/{method} seed {seed} ...", file=sys.stderr, flush=True)
                rows.append(measure(name, method, args.sets, Path(args.out), retrain=not (args.eval_only or args.collect),
                                    reuse_eval=args.collect, seed=seed))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                write_report(rows, args)  # after every run: a long matrix cut short still leaves its rows


def mean_sd(values: list[float], digits: int = 1) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def seed_summary(rows: list[dict]) -> list[str]:
    """Mean ± sample standard deviation over seeds, for each recipe x method run with more than one."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["recipe"], row["method"]), []).append(row)
    repeated = {key: runs for key, runs in groups.items() if len(runs) > 1}
    if not repeated:
        return []

    def points(runs: list[dict], column: str, scale: float = 1.0, digits: int = 1) -> str:
        values = [float(r[column]) * scale for r in runs if r.get(column) not in (None, "")]
        return mean_sd(values, digits) if values else ""

    summary = [{"recipe": recipe, "method": method, "seeds": " ".join(str(r["seed"]) for r in runs),
                "heldout_accuracy_%": points(runs, "heldout_accuracy", 100), "forgetting_points": points(runs, "forgetting_points"),
                "forgetting_confident_points": points(runs, "forgetting_confident_points"),
                "eval_loss": points(runs, "eval_loss", digits=3)}
               for (recipe, method), runs in repeated.items()]
    return ["Over seeds (mean ± sample standard deviation):", "", *markdown_table(summary, list(summary[0])), ""]


def method_matrix(rows: list[dict]) -> list[str]:
    """Held-out accuracy and forgetting as a recipe x method grid (means over seeds), with LoRA as a
    share of full fine-tuning and QLoRA-nf4's distance to LoRA: the issue's quality targets per recipe."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        cells.setdefault((row["recipe"], row["method"]), []).append(row)
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    seen = {r["method"] for r in rows}
    methods = [m for m in METHODS if m in seen] + sorted(seen - set(METHODS))
    if len(recipes) < 2:
        return []

    def mean(recipe: str, method: str, column: str, scale: float) -> float | None:
        values = [float(r[column]) * scale for r in cells.get((recipe, method), []) if r.get(column) not in (None, "")]
        return statistics.fmean(values) if values else None

    def cell(recipe: str, method: str) -> str:
        accuracy, forgetting = mean(recipe, method, "heldout_accuracy", 100), mean(recipe, method, "forgetting_points", 1)
        if accuracy is None:
            return ""
        runs = len(cells[(recipe, method)])
        return f"{accuracy:.1f}" + (f" / {forgetting:.1f}" if forgetting is not None else "") + (f" (n={runs})" if runs > 1 else "")

    grid = []
    for recipe in recipes:
        line = {"recipe": recipe, **{m: cell(recipe, m) for m in methods}}
        lora, full = (mean(recipe, m, "heldout_accuracy", 100) for m in ("lora", "full"))
        line["lora / full"] = f"{100 * lora / full:.1f} %" if lora is not None and full else ""
        for qlora_method in (m for m in ("qlora", "qlora-r64") if m in seen):
            qlora = mean(recipe, qlora_method, "heldout_accuracy", 100)
            line[f"{qlora_method} - lora"] = f"{qlora - lora:+.1f}" if lora is not None and qlora is not None else ""
        grid.append(line)
    title = "Held-out fact accuracy % / forgetting points, recipe x method (mean over the seeds run; n = number of runs):"
    return [title, "", *markdown_table(grid, list(grid[0])), ""]


def write_report(new_rows: list[dict], args: argparse.Namespace) -> None:
    stem = results_stem("methods")
    stem.parent.mkdir(parents=True, exist_ok=True)
    rows = [*earlier_rows(stem, new_rows, ROW_KEY), *new_rows]
    write_csv(stem, rows)
    plots(rows, stem, update_curves(rows, Path(f"{stem}_curves.json")))
    columns = [c for c in rows[0] if c != "run_dir"]
    lines = [
        "# Method comparison", "",
        "Overrides (`--set`): each row's `overrides` column. Accuracy: greedy answers stating the key fact; "
        "forgetting: drop in built-in general-knowledge accuracy vs the base model (points).", "",
        *markdown_table(rows, columns), "",
        *seed_summary(rows),
        *method_matrix(rows),
        f"Plots: `{stem.name}_loss.png` (curves kept in `{stem.name}_curves.json`), `{stem.name}_accuracy.png`, "
        f"`{stem.name}_speed.png`.", "",
        "```", environment(), "```", "",
        "Command: `python -m benchmarks.methods` (rows of several invocations on the same day are merged; "
        f"this one: `--recipes {' '.join(args.recipes)} --methods {' '.join(args.methods)}"
        + (f" --set {' '.join(args.sets)}" if args.sets else "")
        + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [None] else "") + "`)",
    ]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n" + kept_notes(Path(f"{stem}.md")))
    print(f"wrote {stem}.md", file=sys.stderr)


if __name__ == "__main__":
    main()
