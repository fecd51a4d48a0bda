"""How much more confident than the base model a tuned run is on general questions.

Distilled replay trains towards the base model's renormalised top-k distribution, which is a little sharper
than the base model itself; if the tuned model ends up more confident than the base along the base model's
*own* answers, replay is not neutral: it acts like a mild form of training on the base model's greedy
answers, which flips borderline answers (see `2026-11-30_cpu2_forgetting_floor.md`). Measured on the
built-in 33 general questions: the base model's greedy answers (as `peftkit eval` generates them), then the
mean entropy of the next-token distribution and the mean top-1 margin (log-prob of the first token minus the
second) at every answer token, with the run's adapter off and on.

    python -m benchmarks.sharpness_probe RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.common import write_table_report

COLUMNS = ["run", "answer_tokens", "entropy_base", "entropy_tuned", "margin_base", "margin_tuned"]


def answer_sharpness(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]],
                     answers: list[str]) -> tuple[float, float, int]:
    """Mean entropy (nats) and mean top-1 margin of `model`'s next-token distribution at every token of
    `answers` (teacher-forced after each conversation's generation prompt), and the number of tokens."""
    import torch

    entropy = margin = 0.0
    tokens = 0
    for conversation, answer in zip(conversations, answers, strict=True):
        prompt = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not answer_ids:
            continue
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        entropy += float(-(log_probs.exp() * log_probs).sum())
        top = log_probs.topk(2, dim=-1).values
        margin += float((top[:, 0] - top[:, 1]).sum())
        tokens += len(answer_ids)
    if not tokens:
        raise ValueError("no answer tokens to measure")
    return entropy / tokens, margin / tokens, tokens


def probe_row(run_dir: Path) -> dict[str, Any]:
    from peftkit.data.build import load_heldout
    from peftkit.evaluate.generation import generate_replies
    from peftkit.evaluate.run_eval import GENERAL_SET, builtin_resource, model_before_tuning
    from peftkit.runs import load_run

    run = load_run(run_dir)
    conversations = [list(item.messages) for item in load_heldout(builtin_resource(GENERAL_SET), None)]
    with model_before_tuning(run) as base:
        answers = [r.text for r in generate_replies(base, run.tokenizer, conversations,
                                                    max_new_tokens=run.recipe.eval.max_new_tokens)]
        entropy_base, margin_base, tokens = answer_sharpness(base, run.tokenizer, conversations, answers)
    entropy_tuned, margin_tuned, _ = answer_sharpness(run.model, run.tokenizer, conversations, answers)
    return {"run": str(run_dir), "answer_tokens": tokens, "entropy_base": round(entropy_base, 3),
            "entropy_tuned": round(entropy_tuned, 3), "margin_base": round(margin_base, 3),
            "margin_tuned": round(margin_tuned, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="finished run directories with an adapter")
    args = parser.parse_args()
    rows = [probe_row(run_dir) for run_dir in args.run_dirs]
    write_table_report("sharpness", rows, ("run",),
                       "# Confidence on general questions, base model against tuned run\n\n"
                       "Mean next-token entropy (nats) and top-1 margin at each token of the base model's greedy "
                       "answers to the built-in 33 general questions (no system prompt), adapter off (base) and "
                       "on (tuned). Lower entropy and a larger margin: more confident than the base.\n\n",
                       COLUMNS)


if __name__ == "__main__":
    main()
