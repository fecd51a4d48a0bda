"""Default hyper-parameters across recipes: each setting trained on every domain recipe.

    python -m benchmarks.sweep [--recipes quickstart support-desk clinic it-helpdesk] [--settings default neftune5]

Defaults must generalise to data we have not seen, so a candidate setting only replaces the
default when it wins on the held-out accuracy averaged over all recipes, not on one of them.
Writes benchmarks/results/<date>_<machine>_sweep.{md,csv} and a per-recipe before/after table
that recipes/README.md quotes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.common import earlier_rows, environment, markdown_table, results_stem, write_csv
from benchmarks.common import kept_notes
from benchmarks.methods import PEFTKIT, ROOT, run, train_run

RECIPES = ["quickstart", "support-desk", "clinic", "it-helpdesk"]
SETTINGS: dict[str, list[str]] = {
    "default": [],
    "neftune5": ["train.neftune_noise_alpha=5"],
    "epochs8": ["train.epochs=8"],
    "r32": ["adapter.r=32", "adapter.alpha=64"],
    "lr5e-4": ["train.lr=5e-4"],
    "epochs3": ["train.epochs=3"],
    "replay": ["data.replay.path=builtin:general"],
    # Forgetting vs learning trade-off: smaller steps, with replay.
    "replay-lr5e-4": ["data.replay.path=builtin:general", "train.lr=5e-4"],
    "replay-lr2e-4": ["data.replay.path=builtin:general", "train.lr=2e-4"],
    "lr2e-4": ["train.lr=2e-4"],
    # LoRA+ (B matrices at 16x the learning rate of A), with A below the plain LoRA rate as the paper advises.
    "loraplus16": ["adapter.loraplus_lr_ratio=16", "train.lr=2.5e-4"],
}


ROW_KEY = ("setting", "recipe")


def measure(name: str, setting: str, out_root: Path, *, forgetting: bool, retrain: bool) -> dict:
    run_dir = out_root / f"{name}-{setting}"
    if retrain or not (run_dir / "summary.json").is_file():
        train_run(ROOT / "recipes" / f"{name}.yaml", SETTINGS[setting], run_dir)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    row = {
        "setting": setting,
        "recipe": name,
        "heldout_before": summary["heldout_accuracy_before"],
        "heldout_after": summary["heldout_accuracy_after"],
        "eval_loss_before": round(summary["eval_loss_before"], 3),
        "eval_loss_after": round(summary["eval_loss_after"], 3),
        "train_seconds": summary["train_seconds"],
        "overfitting_warning": summary.get("overfitting_warning"),
    }
    if forgetting:  # `peftkit eval`: general-knowledge accuracy of the base and the tuned model
        run([*PEFTKIT, "eval", str(run_dir)])
        report = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
        row.update(general_after=report["after"]["general_accuracy"], forgetting_points=report["forgetting_points"])
    return row


def _means(rows: list[dict]) -> str:
    scores = [r["heldout_after"] for r in rows if r["heldout_after"] is not None]
    forgot = [r["forgetting_points"] for r in rows if r.get("forgetting_points") not in (None, "")]
    text = f"held-out {sum(scores) / len(scores):.3f} over {len(scores)} recipes"
    return text + (f"; forgetting {sum(forgot) / len(forgot):.1f} points over {len(forgot)}" if forgot else "")


def mean_lines(rows: list[dict]) -> list[str]:
    """Per setting: mean held-out accuracy (and forgetting where measured) over the recipes it ran on,
    next to `default` on exactly those recipes when it ran on fewer (means over different recipes do not compare)."""
    lines = []
    default = {r["recipe"]: r for r in rows if r["setting"] == "default"}
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting]
        line = f"- `{setting}`: {_means(mine)}"
        same = [default[r["recipe"]] for r in mine if r["recipe"] in default]
        if setting != "default" and same and len(same) < len(default):
            line += f" (`default` on the same recipes: {_means(same)})"
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", nargs="*", default=RECIPES)
    parser.add_argument("--settings", nargs="*", default=["default", "neftune5"], choices=list(SETTINGS))
    parser.add_argument("--out", default=str(ROOT / "runs" / "sweep"))
    parser.add_argument("--forgetting", action="store_true", help="also run `peftkit eval` (general-knowledge forgetting)")
    parser.add_argument("--eval-only", action="store_true", help="measure existing runs instead of training again")
    args = parser.parse_args()
    stem = results_stem("sweep")
    rows: list[dict] = []
    for setting in args.settings:
        for name in args.recipes:
            print(f"{name}/{setting} ...", file=sys.stderr, flush=True)
            rows.append(measure(name, setting, Path(args.out), forgetting=args.forgetting, retrain=not args.eval_only))
            print(rows[-1], file=sys.stderr, flush=True)
            write_report(stem, [*earlier_rows(stem, rows, ROW_KEY), *rows], args)


def tradeoff_plot(rows: list[dict], path: Path) -> bool:
    """Held-out accuracy against forgetting, one colour per setting: where a setting sits between
    learning the domain and keeping general knowledge. False when no row has forgetting measured."""
    measured = [r for r in rows if r.get("forgetting_points") not in (None, "") and r.get("heldout_after") is not None]
    if not measured:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for setting in dict.fromkeys(r["setting"] for r in measured):
        mine = [r for r in measured if r["setting"] == setting]
        ax.scatter([100 * r["heldout_after"] for r in mine], [r["forgetting_points"] for r in mine], label=setting)
        for r in mine:
            ax.annotate(r["recipe"], (100 * r["heldout_after"], r["forgetting_points"]), fontsize=6)
    ax.set_xlabel("held-out fact accuracy after tuning (%)")
    ax.set_ylabel("forgetting (points of general-knowledge accuracy)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(stem: Path, rows: list[dict], args: argparse.Namespace) -> None:
    write_csv(stem, rows)
    plotted = tradeoff_plot(rows, Path(f"{stem}_tradeoff.png"))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    lines = ["# Default hyper-parameter sweep", "",
             "Each setting is the recipe's own configuration plus the overrides below (seed 42, one run each).", "",
             *(f"- `{s}`: `{' '.join(SETTINGS[s]) or 'recipe as written'}`" for s in settings), "",
             *markdown_table(rows, columns), "",
             "Means per setting:", "", *mean_lines(rows), "",
             *([f"Plot: `{stem.name}_tradeoff.png` (held-out accuracy against forgetting).", ""] if plotted else []),
             "```", environment(), "```", "",
             "Command: `python -m benchmarks.sweep` (rows of several invocations on the same day are merged; this one: "
             f"`--recipes {' '.join(args.recipes)} --settings {' '.join(args.settings)}"
             + (" --forgetting" if args.forgetting else "") + (" --eval-only" if args.eval_only else "") + "`)"]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n" + kept_notes(Path(f"{stem}.md")))
    print(f"wrote {stem}.md", file=sys.stderr)


if __name__ == "__main__":
    main()
