"""CLI sub-commands of the evaluation area (`eval`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_eval(args: argparse.Namespace) -> int:
    from peftkit.evaluate.run_eval import evaluate_run, print_eval_report
    from peftkit.runs import read_run_recipe, use_run_threads
    from peftkit.train.run_dir import reading_runs
    from peftkit.utils.console import stdout_console

    run_dir = Path(args.run_dir).expanduser().resolve()  # the model card and eval.json name it as a path that works anywhere
    use_run_threads(read_run_recipe(run_dir), "evaluating")
    with reading_runs(run_dir):
        report = evaluate_run(
            run_dir,
            data=args.data,
            heldout=args.heldout,
            general=args.general,
            max_new_tokens=args.max_new_tokens,
            compare_base=not args.no_base,
            qlora_base=args.qlora_base,
            out=args.out,
        )
        print_eval_report(stdout_console(highlight=False, soft_wrap=True), report)  # evaluate_run refreshed the model card
    return 0


def register(sub: Any) -> None:
    """Add this area's sub-commands to the `peftkit` parser."""
    from peftkit.cli import positive_int
    from peftkit.runs import add_qlora_base_option

    p = sub.add_parser("eval", help="loss, held-out fact accuracy and forgetting of a trained run (writes eval.json)",
                       description="Writes RUN_DIR/eval.json (RUN_DIR/eval_original_base.json with --qlora-base original).")
    p.add_argument("run_dir", help="run directory (output_dir of `peftkit train`)")
    p.add_argument("--data", help="chat/alpaca/text file for the loss (default: the run's eval split)")
    p.add_argument("--heldout", help='held-out questions {"question", "key_fact"} (default: data.heldout of the recipe)')
    p.add_argument("--general", help="general-knowledge set for forgetting (default: the built-in one)")
    p.add_argument("--max-new-tokens", type=positive_int, help="reply length (default: the recipe's eval.max_new_tokens)")
    p.add_argument("--no-base", action="store_true", help="skip the base-model comparison")
    p.add_argument("--out", help="write the report here instead of RUN_DIR/eval.json (e.g. an eval with "
                                 "another --general set beside the run's own)")
    add_qlora_base_option(p)
    p.set_defaults(func=cmd_eval)
