"""Seed soups: average the LoRA updates of runs that differ only in their seed, then evaluate.

Separates the two parts of a setting's forgetting: what one seed loses by chance averages out in the
soup, what every seed's update carries stays. Each group is a list of finished LoRA run directories
(same recipe and base, different `train.seed`); the soup is `peftkit merge --adapters ...`'s exact
`cat` combination with equal weights, evaluated like `peftkit eval` (held-out facts with the recipe's
system prompt, the built-in forgetting set, and the independent check set). Members' figures are read
from their `eval.json` (or `eval.bench.json`).

    python -m benchmarks.seed_soup NAME=RUN_DIR,RUN_DIR[,...] [NAME=...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.common import write_table_report

ROOT = Path(__file__).resolve().parents[1]
CHECK_SET = ROOT / "benchmarks" / "data" / "general_check.jsonl"
COLUMNS = ["group", "members", "member_heldout", "member_forgetting", "soup_heldout", "soup_forgetting",
           "soup_check_accuracy", "soup_lost"]


def member_report(run_dir: Path) -> dict[str, Any]:
    for name in ("eval.bench.json", "eval.json"):
        if (run_dir / name).is_file():
            return json.loads((run_dir / name).read_text(encoding="utf-8"))
    raise SystemExit(f"{run_dir} has no eval.json; run `peftkit eval {run_dir}` first")


def soup_row(group: str, run_dirs: list[Path]) -> dict[str, Any]:
    from peftkit.data.build import load_heldout
    from peftkit.evaluate.generation import heldout_accuracy
    from peftkit.evaluate.run_eval import GENERAL_SET, builtin_resource
    from peftkit.export.merge import combine_runs

    members = [member_report(r) for r in run_dirs]
    soup = combine_runs(run_dirs)
    recipe = soup.primary.recipe
    new_tokens, batch = recipe.eval.max_new_tokens, recipe.eval.batch_size

    def accuracy(path: Path | str, system: str | None, label: str) -> tuple[float, list[dict[str, Any]]]:
        return heldout_accuracy(soup.model, soup.tokenizer, load_heldout(path, system),
                                max_new_tokens=new_tokens, batch_size=batch, label=label)

    heldout, _ = accuracy(run_dirs[0] / "heldout.jsonl", recipe.data.system_prompt, "held-out questions")
    general, details = accuracy(builtin_resource(GENERAL_SET), None, "general questions")
    check, _ = accuracy(CHECK_SET, None, "check questions")
    base_general = members[0]["before"]["general_accuracy"]  # the same base for every member
    return {
        "group": group,
        "members": " ".join(r.name for r in run_dirs),
        "member_heldout": " / ".join(f"{100 * m['after']['heldout_accuracy']:.1f}" for m in members),
        "member_forgetting": " / ".join("n/a" if m["forgetting_points"] is None else f"{m['forgetting_points']:.1f}"
                                        for m in members),  # n/a: the base model knows none of the set
        "soup_heldout": round(100 * heldout, 1),
        "soup_forgetting": round(100 * (base_general - general), 1),
        "soup_check_accuracy": round(100 * check, 1),
        "soup_lost": "; ".join(d["question"] for d in details if not d["correct"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="+", help="NAME=RUN_DIR,RUN_DIR[,...] (at least two runs per group)")
    args = parser.parse_args()
    groups = []
    for spec in args.groups:
        name, _, dirs = spec.partition("=")
        run_dirs = [Path(d) for d in dirs.split(",") if d]
        if not name or len(run_dirs) < 2:
            raise SystemExit(f"`{spec}`: give NAME=RUN_DIR,RUN_DIR[,...] with at least two run directories")
        groups.append((name, run_dirs))
    rows = [soup_row(name, run_dirs) for name, run_dirs in groups]
    write_table_report("seed_soup", rows, ("group",),
                       "# Seed soups: equal-weight averages of LoRA updates trained with different seeds\n\n"
                       "Held-out and forgetting in points (forgetting: built-in 33-question set; check: accuracy on the "
                       "80-question `benchmarks/data/general_check.jsonl`).\n\n", COLUMNS)


if __name__ == "__main__":
    main()
