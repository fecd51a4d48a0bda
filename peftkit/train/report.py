"""The end-of-run summary printed to the terminal."""

from __future__ import annotations

import json

from pathlib import Path
from typing import Any

from rich.text import Text  # names, paths and the model's replies are data: never parsed as markup


def unfrozen_at_end(summary: dict[str, Any]) -> str:
    """The trainable count a gradual unfreezing schedule ended with, after the count it started with."""
    end = summary.get("trainable_params_end")
    return f"; {end:,} at the end (gradual unfreezing)" if end is not None else ""


def _num(value: Any, pattern: str = "{:.4f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def tokens_rate(value: float | None) -> str:
    """Tokens per second: whole numbers, but two significant digits below 10 (a slow CPU run is not "0 tok/s")."""
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


def _eval_part(summary: dict[str, Any]) -> str:
    """The evaluations within the training time, which the tokens/s figure leaves out."""
    seconds = summary.get("eval_seconds_in_training") or 0
    return f" (evaluation {seconds:.0f} s of it, not in tok/s)" if seconds >= 0.5 else ""


def heldout_samples(details: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first held-out answer that holds its key fact and the first that misses it, in the file's order (the first
    two alone were two misses for a trial's 61.8 % run, read as a failed one); the first two where all are right or
    all missed."""
    right = next((d for d in details if d["correct"]), None)
    missed = next((d for d in details if not d["correct"]), None)
    if right is None or missed is None:
        return details[:2]
    return [d for d in details if d is right or d is missed]


def _sample_verdict(sample: dict[str, Any]) -> tuple[str | tuple[str, str], ...]:
    """A held-out sample's score: `(right: holds "9:30")` / `(missed: the key fact is "9:30")`; nothing for a recipe's
    own prompt."""
    if "correct" not in sample:
        return ()
    facts = " / ".join(f'"{fact}"' if '"' not in fact else f"'{fact}'" if "'" not in fact else json.dumps(fact)
                       for fact in sample.get("key_fact") or [])
    return ("\n   ", (f"(right: holds {facts})", "green") if sample["correct"]
            else (f"(missed: the key fact is {facts})", "yellow"))


def eval_loss_rose(summary: dict[str, Any]) -> str | None:
    """A sentence when training left the eval loss above the untrained model's (by over 1 %, past rounding and
    step noise): the run made the model worse on the held-back data, which a too-high learning rate does. Not for
    classification, whose "before" is a randomly initialised head (its loss may rise as its accuracy does)."""
    before, after = summary.get("eval_loss_before"), summary.get("eval_loss_after")
    if summary.get("task") == "sequence_classification" or before is None or after is None or not after > 1.01 * before:
        return None
    from peftkit.config.validate import USUAL_LR

    usual = USUAL_LR.get(summary.get("method", ""))
    rates = f" ({summary['method']} usually trains at {usual[0]:g} to {usual[1]:g})" if usual else ""
    return (f"the eval loss rose from {before:.4f} to {after:.4f} over training: the tuned model fits the eval data "
            f"worse than the base model did. Lower train.lr{rates} and train again; the held-out answers show what it "
            "learnt")


def _tools_flag(run_dir: Path) -> list[str]:
    """`--tools TRAIN_FILE` for a run that trained on tool use: chat shows the model the schemas of the training
    data's first record with tools (without them it never sees the functions it learnt to call). Nothing where chat
    would not read that file (a hub dataset, a folder)."""
    import yaml

    from peftkit.data.formats import read_tools
    from peftkit.errors import PeftkitError

    try:
        train = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))["data"]["train"]
        if not isinstance(train, str) or not Path(train).is_file():
            return []
        read_tools(train)
    except (OSError, yaml.YAMLError, KeyError, TypeError, PeftkitError):
        return []
    return ["--tools", train]


def print_run_report(console: Any, run_dir: Path, summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=Text(f"{summary['recipe']} ({summary['method']} on {summary['base_model']})"))
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("eval loss", _num(summary["eval_loss_before"]), _num(summary["eval_loss_after"]))
    pct = "{:.1%}"
    if summary.get("eval_accuracy_after") is not None:  # a classifier's own measures of its eval split
        table.add_row("eval accuracy", _num(summary.get("eval_accuracy_before"), pct), _num(summary["eval_accuracy_after"], pct))
        table.add_row("eval macro-F1", _num(summary.get("eval_macro_f1_before")), _num(summary.get("eval_macro_f1_after")))
    if summary.get("heldout_questions"):  # no held-out file: no row of n/a
        classifier = summary.get("task") == "sequence_classification"  # held-out texts with labels, not questions
        table.add_row(
            f"held-out {'label' if classifier else 'fact'} accuracy ({summary['heldout_questions']} "
            f"{'texts' if classifier else 'q'})",
            _num(summary["heldout_accuracy_before"], pct),
            _num(summary["heldout_accuracy_after"], pct),
        )
    console.print(table)
    console.print(
        f"trainable {summary['trainable_params']:,} / {summary['total_params']:,} params "
        f"({summary['trainable_share']:.3%}{unfrozen_at_end(summary)}) | {summary['steps']} steps | "
        f"{summary['trained_tokens']:,} {'input' if summary.get('task') == 'sequence_classification' else 'supervised'} "
        f"tokens at {tokens_rate(summary['tokens_per_second'])} tok/s | "
        f"train {summary['train_seconds']:.0f} s{_eval_part(summary)}, total {summary['wall_seconds']:.0f} s | "
        f"peak memory {summary['peak_memory_mb']:.0f} MiB"
    )
    best = summary.get("weights_from_step")
    if summary.get("stopped_early"):
        console.print("stopped early: the eval loss stopped improving (train.early_stopping_patience); the saved "
                      "weights are the best evaluation's" + (f", step {best}" if best else ""))
    elif best and best != summary["steps"]:
        console.print(f"the saved weights are step {best}'s, the best evaluation (train.early_stopping_patience)")
    worse = eval_loss_rose(summary)
    if worse:
        console.print(Text.assemble(("worse than the base:", "yellow"), f" {worse}"))
    if summary.get("overfitting_warning"):
        console.print("[yellow]overfitting:[/yellow] the eval loss rose while the train loss kept falling (see "
                      "plots/loss.png); if the held-out answers suffer, consider fewer epochs, a lower lr, or "
                      "train.early_stopping_patience (the defaults accept a little of it for more facts learnt: "
                      "recipes/README.md)")
    for sample in summary.get("samples", []):
        console.print(Text.assemble("\n", ("Q:", "bold"), f" {sample['prompt']}\n", ("A:", "bold"), f" {sample['reply']}",
                                    *_sample_verdict(sample)))
    from peftkit.utils.command_name import command

    tools = _tools_flag(run_dir) if (summary.get("data_stats") or {}).get("train_with_tools") else []
    next_step = ("scores in summary.json" if summary.get("task") == "sequence_classification"
                 else f"chat: {command('chat', str(run_dir), *tools)}; what it forgot of general knowledge: "
                      f"{command('eval', str(run_dir))}")
    console.print(f"\nRun directory: {run_dir}  ({next_step})", markup=False)
