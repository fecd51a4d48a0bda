"""The forgetting score's noise floor: what changes to the base model that teach and remove nothing "forget".

Each perturbation leaves the base model's knowledge as it is (rounding its weights to bf16 or fp16, as a
GPU user loads them; adding small Gaussian noise), then asks the general set as `peftkit eval` does. Whatever
such a model loses is chance: answers that hinge on a near-tie. The table gives the points lost over the whole
set and over the questions the base model answers confidently (`peftkit.evaluate.margins`), and each
question's decision margin, so the two scores can be read against the floor they stand on.

    python -m benchmarks.noise_floor [--recipe recipes/quickstart.yaml] [--general FILE ...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import environment, markdown_table, recipe_with_base_model, results_stem, write_csv

Perturbation = Callable[[Any, int], Any]


def _rounded(dtype_name: str) -> Perturbation:
    def apply(weight: Any, seed: int) -> Any:
        import torch

        return weight.to(getattr(torch, dtype_name)).float()
    return apply


def _noise(relative: float) -> Perturbation:
    def apply(weight: Any, seed: int) -> Any:
        import torch

        generator = torch.Generator().manual_seed(seed)
        return weight + relative * weight.std() * torch.randn(weight.shape, generator=generator)
    return apply


PERTURBATIONS: dict[str, Perturbation] = {
    "bf16 weights": _rounded("bfloat16"),
    "fp16 weights": _rounded("float16"),
    "noise 0.1 %": _noise(1e-3),
    "noise 0.3 %": _noise(3e-3),
    "noise 1 %": _noise(1e-2),
}


def floor_rows(model: Any, tokenizer: Any, items: list[Any], *, max_new_tokens: int, batch_size: int,
               seeds: list[int], set_name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One row per perturbation (and seed, for the random ones), and the per-question margins of the base model."""
    import torch

    from peftkit.evaluate.generation import answer_items, score_replies
    from peftkit.evaluate.margins import confidently_known, decision_margins

    def ask(label: str) -> tuple[list[dict[str, Any]], list[Any]]:
        replies = answer_items(model, tokenizer, items, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               label=label)
        return score_replies(items, replies)[1], replies

    base_details, base_replies = ask("base model")
    margins = decision_margins(model, tokenizer, items, base_replies)
    known = [i for i, d in enumerate(base_details) if d["correct"]]
    confident = set(confidently_known(margins))
    original = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def set_weights(change: Callable[[Any], Any]) -> None:
        for parameter_name, parameter in model.named_parameters():
            parameter.copy_(change(original[parameter_name]))

    rows = []
    for name, perturb in PERTURBATIONS.items():
        random = name.startswith("noise")
        for seed in (seeds if random else [0]):
            set_weights(lambda weight: perturb(weight, seed))
            details, _ = ask(name)
            lost = [i for i in known if not details[i]["correct"]]
            lost_confident = sum(i in confident for i in lost)
            rows.append({"set": set_name, "perturbation": name, "seed": seed if random else "",
                         "known": len(known), "lost": len(lost),
                         "forgetting": round(100 * len(lost) / max(len(known), 1), 1),
                         "confident": len(confident),
                         "lost_confident": lost_confident,
                         "forgetting_confident": round(100 * lost_confident / max(len(confident), 1), 1),
                         "lost_questions (base margin)": "; ".join(
                             f"{base_details[i]['question']} ({margins[i]:.2f})" for i in lost)})
    set_weights(lambda weight: weight)
    margin_rows = [{"set": set_name, "question": d["question"], "base_correct": d["correct"],
                    "margin": "" if m is None else round(m, 3), "confident": i in confident}
                   for i, (d, m) in enumerate(zip(base_details, margins, strict=True))]
    return rows, margin_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--general", nargs="*", default=None,
                        help="question sets (default: the built-in forgetting set and benchmarks/data/general_check.jsonl)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    args = parser.parse_args()

    from peftkit.data.build import load_heldout
    from peftkit.evaluate.run_eval import GENERAL_SET, builtin_resource

    recipe, tokenizer, model = recipe_with_base_model(args.recipe)
    sets = args.general or [str(builtin_resource(GENERAL_SET)), str(Path(__file__).parent / "data" / "general_check.jsonl")]
    rows: list[dict[str, Any]] = []
    margins: list[dict[str, Any]] = []
    for path in sets:
        found, margin_rows = floor_rows(model, tokenizer, load_heldout(path, None),
                                        max_new_tokens=recipe.eval.max_new_tokens, batch_size=recipe.eval.batch_size,
                                        seeds=args.seeds, set_name=Path(path).name)
        rows += found
        margins += margin_rows
    stem = results_stem("noise_floor")
    write_csv(stem, rows)
    write_csv(Path(f"{stem}_margins"), margins)
    text = "\n".join([
        "# The forgetting score's noise floor",
        "",
        f"Base model of `{args.recipe}` ({recipe.model.name}), greedy, {recipe.eval.max_new_tokens} new tokens, no system "
        "prompt. Each perturbation keeps the base model's knowledge (weights rounded to bf16 / fp16; Gaussian noise "
        "of the given share of each tensor's standard deviation); `lost` counts questions the base model answers and "
        "the perturbed one does not. `confident`: answered with a decision margin of at least ln 2 (each token up to "
        "the key fact at least twice as likely as the runner-up).",
        "",
        *markdown_table(rows, list(rows[0])),
        "",
        f"Per-question margins: `{stem.name}_margins.csv`.",
        "",
        "```", environment(), "```", "",
        f"Command: `python -m benchmarks.noise_floor {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
    ])
    Path(f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
