"""Default hyper-parameters across recipes: each setting trained on every domain recipe.

    python -m benchmarks.sweep [--recipes quickstart support-desk clinic it-helpdesk] [--settings default neftune5]

Defaults must generalise to data we have not seen, so a candidate setting only replaces the
default when it wins on the held-out accuracy averaged over all recipes, not on one of them.
Writes benchmarks/results/<date>_<machine>_sweep.{md,csv} and a per-recipe before/after table
that recipes/README.md quotes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.common import environment, markdown_table, write_csv, results_stem
from benchmarks.methods import ROOT, train_run

RECIPES = ["quickstart", "support-desk", "clinic", "it-helpdesk"]
SETTINGS: dict[str, list[str]] = {
    "default": [],
    "neftune5": ["train.neftune_noise_alpha=5"],
    "epochs8": ["train.epochs=8"],
    "r32": ["adapter.r=32", "adapter.alpha=64"],
    "lr5e-4": ["train.lr=5e-4"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", nargs="*", default=RECIPES)
    parser.add_argument("--settings", nargs="*", default=["default", "neftune5"], choices=list(SETTINGS))
    parser.add_argument("--out", default=str(ROOT / "runs" / "sweep"))
    args = parser.parse_args()
    rows = []
    for setting in args.settings:
        for name in args.recipes:
            print(f"{name}/{setting} ...", file=sys.stderr, flush=True)
            summary = train_run(ROOT / "recipes" / f"{name}.yaml", SETTINGS[setting], Path(args.out) / f"{name}-{setting}")
            rows.append({
                "setting": setting,
                "recipe": name,
                "heldout_before": summary["heldout_accuracy_before"],
                "heldout_after": summary["heldout_accuracy_after"],
                "eval_loss_before": round(summary["eval_loss_before"], 3),
                "eval_loss_after": round(summary["eval_loss_after"], 3),
                "train_seconds": summary["train_seconds"],
                "overfitting_warning": summary.get("overfitting_warning"),
            })
            print(rows[-1], file=sys.stderr, flush=True)
    stem = results_stem("sweep")
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_csv(stem, rows)
    columns = list(rows[0])
    lines = ["# Default hyper-parameter sweep", "",
             "Each setting is the recipe's own configuration plus the overrides below, trained on every recipe.", "",
             *(f"- `{s}`: `{' '.join(SETTINGS[s]) or 'recipe as written'}`" for s in args.settings), "",
             *markdown_table(rows, columns), "",
             "Mean held-out accuracy per setting:", ""]
    for setting in args.settings:
        scores = [r["heldout_after"] for r in rows if r["setting"] == setting and r["heldout_after"] is not None]
        lines.append(f"- `{setting}`: {sum(scores) / len(scores):.3f} over {len(scores)} recipes")
    lines += ["", "```", environment(), "```", "",
              f"Command: `python -m benchmarks.sweep --recipes {' '.join(args.recipes)} --settings {' '.join(args.settings)}`"]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md", file=sys.stderr)


if __name__ == "__main__":
    main()
