"""How firmly the base model knows each forgetting-set answer: the same question in five wordings.

A question the base model answers in one wording only is a fluke, and any update may flip it; one it
answers in every wording is knowledge, and losing it after tuning is forgetting. The wordings are
generic (a prefix or a suffix around the question), fixed before looking at any result.

    python -m benchmarks.rephrase_probe [--recipe recipes/quickstart.yaml] [--general FILE]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import environment, markdown_table, recipe_with_base_model, results_stem, write_csv

ROOT = Path(__file__).resolve().parents[1]
WORDINGS = ("{q}", "Question: {q}", "{q} Answer briefly.", "Please tell me: {q}", "Quick question. {q}")


def rephrase_scores(model: Any, tokenizer: Any, items: Sequence[Any], *, max_new_tokens: int,
                    batch_size: int) -> list[dict[str, Any]]:
    """Per question: which of the WORDINGS the model answers with the key fact (greedy)."""
    from peftkit.evaluate.generation import generate_replies, is_correct

    conversations = [[{"role": "user", "content": w.format(q=item.messages[-1]["content"])}]
                     for item in items for w in WORDINGS]
    replies = generate_replies(model, tokenizer, conversations, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, progress="rephrased questions")
    rows = []
    for i, item in enumerate(items):
        correct = [is_correct(replies[i * len(WORDINGS) + j].text, item.key_facts) for j in range(len(WORDINGS))]
        rows.append({"question": item.messages[-1]["content"], "wordings_correct": f"{sum(correct)} / {len(WORDINGS)}",
                     **{f"w{j}": int(c) for j, c in enumerate(correct)}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    parser.add_argument("--general", default=None, help="question set (default: the built-in forgetting set)")
    args = parser.parse_args()

    from peftkit.data.build import load_heldout
    from peftkit.evaluate.run_eval import GENERAL_SET, builtin_resource

    recipe, tokenizer, model = recipe_with_base_model(args.recipe)
    items = load_heldout(args.general or builtin_resource(GENERAL_SET), None)
    rows = rephrase_scores(model, tokenizer, items, max_new_tokens=recipe.eval.max_new_tokens,
                           batch_size=recipe.eval.batch_size)
    stem = results_stem("rephrase_probe")
    table = "\n".join(markdown_table(rows, list(rows[0])))
    firm = sum(all(r[f"w{j}"] for j in range(len(WORDINGS))) for r in rows)
    text = (f"# Forgetting set in {len(WORDINGS)} wordings (base model `{recipe.model.name}`, greedy, "
            f"{recipe.eval.max_new_tokens} new tokens)\n\n"
            + "Wordings: " + ", ".join(f"w{j} `{w}`" for j, w in enumerate(WORDINGS))
            + f"\n\nAnswered in every wording: {firm} of {len(rows)}.\n\n{table}\n\n```\n{environment()}\n```\n")
    write_csv(stem, rows)
    Path(f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
