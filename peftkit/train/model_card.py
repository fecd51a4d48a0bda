"""The run directory's README.md: what was trained, on what, with which results."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from peftkit.adapters import effective_quantization
from peftkit.config.schema import Recipe, method_label
from peftkit.data.files import data_sources
from peftkit.export.card import bnb_kwargs, quantized_base_loading
from peftkit.train.report import eval_loss_rose, tokens_rate, unfrozen_at_end
from peftkit.utils.atomic import atomic_write_text


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _eval_section(run_dir: Path) -> list[str]:
    """Results of `peftkit eval`, when it has been run on this directory."""
    from peftkit.evaluate.run_eval import REPORT  # the as-trained report; eval_original_base.json is not shown

    path = run_dir / REPORT
    if not path.is_file():
        return []
    report = json.loads(path.read_text(encoding="utf-8"))
    before, after = report.get("before", {}), report.get("after", {})
    lines = ["## Evaluation (`peftkit eval`)", "", "| metric | base | tuned |", "|---|---|---|"]
    heldout = f"held-out fact accuracy ({report.get('heldout_questions')} q" + (
        f", `{Path(report['heldout_set']).name}`)" if report.get("heldout_set") else ")")
    general_set = report.get("general_set")  # absent from reports written before it was recorded
    general = f"general knowledge ({report.get('general_questions')} q" + (
        "" if general_set is None else ", built-in" if general_set.startswith("built-in") else f", `{Path(general_set).name}`") + ")"
    for label, key in [(_eval_loss_label(report), "loss"), (heldout, "heldout_accuracy"), (general, "general_accuracy"),
                       ("general knowledge, with the system prompt", "general_in_role_accuracy")]:
        if key in after:
            fmt = _pct if key.endswith("accuracy") else _loss
            lines.append(f"| {label} | {fmt(before.get(key))} | {fmt(after.get(key))} |")
    if report.get("max_new_tokens") is not None:
        lines += ["", f"Replies: greedy, up to {report['max_new_tokens']} new tokens."]
    if before.get("general_accuracy") == 0 and "general_accuracy" in after:
        lines += ["", "Forgetting: n/a (the base model answers none of the general questions: nothing to forget)."]
    elif report.get("forgetting_points") is not None:
        from peftkit.evaluate.run_eval import lost_points

        in_role = report.get("forgetting_in_role_points")
        lines += ["", f"Forgetting: {lost_points(report['forgetting_points'])} of general-knowledge accuracy"
                  + (f" ({lost_points(in_role)} with the recipe's system prompt)." if in_role is not None else ".")]
    if report.get("forgetting_confident_points") is not None:
        from peftkit.evaluate.run_eval import lost_points

        lines.append(f"On the {report['general_confident_questions']} general questions the base model answers confidently "
                     f"(no near-tie on the way to the answer): {lost_points(report['forgetting_confident_points'])}.")
    return [*lines, ""]


def _eval_loss_label(report: dict[str, Any]) -> str:
    """The loss row names its data: `--data` can be another file than the eval set of the training table above."""
    from peftkit.evaluate.run_eval import RUN_EVAL_SPLIT

    source = report.get("eval_data")  # absent from reports written before it was recorded
    if source is None:
        return "loss"
    where = "the run's eval split, as in Results" if source == RUN_EVAL_SPLIT else f"`{Path(source).name}` (--data)"
    rows = report.get("eval_examples")
    return f"loss ({where}, {rows} row{'s' * (rows != 1)})"


def _workers(summary: dict[str, Any]) -> str:
    """`2 threads`, or for a multi-process run `2 processes x 1 thread, global batch 8`."""
    threads = f"{summary['threads']} thread{'s' * (summary['threads'] != 1)}"
    processes = summary.get("processes") or 1  # absent from summaries written before it was recorded
    if processes == 1:
        return threads
    return f"{processes} processes x {threads}, global batch {summary.get('global_batch_size')}"


def _split_note(recipe: Recipe, summary: dict[str, Any]) -> str:
    """`; 24 more held out as the eval split` where the eval rows came from the training files (the file has more)."""
    held = summary.get("eval_examples") or 0
    return f"; {held} more held out as the eval split" if held and not recipe.data.eval else ""


def _examples(summary: dict[str, Any]) -> str:
    """`12 examples`, or `4 examples (16 rows)` where long texts were split or a template made a row per turn."""
    examples, rows = summary["train_examples"], summary.get("train_rows")
    return f"{examples} examples" + (f" ({rows} rows)" if rows is not None and rows != examples else "")


def _trained_quantization(run_dir: Path, recipe: Recipe) -> Any:
    """The quantization the card's loading snippet repeats: `compute_dtype: auto` as the run resolved it."""
    from peftkit.runs import trained_quantization

    return trained_quantization(run_dir, effective_quantization(recipe))


def stopping_note(summary: dict[str, Any]) -> str:
    best = summary.get("weights_from_step")
    if summary.get("stopped_early"):
        return " (stopped early" + (f"; the weights are step {best}'s, the best evaluation)" if best else ")")
    return f" (the weights are step {best}'s, the best evaluation)" if best and best != summary["steps"] else ""


def _what_was_trained(run_dir: Path, recipe: Recipe) -> str:
    """`lora adapter for`, or for full / partial runs (no adapter: the model itself was trained) `partial fine-tune of`."""
    return f"{recipe.adapter.method} fine-tune of" if (run_dir / "model").is_dir() else f"{method_label(recipe.adapter)} adapter for"


def _plain_use(run_dir: Path, system_prompt: str | None = None, quantization: Any = None) -> list[str]:
    """How to load the result without peftkit: an adapter (peft; a QLoRA one on its quantized base), or the whole
    model (full / partial runs). With the recipe's system prompt the snippet sends it: without it the chat template
    may add its own default one, which the model was not trained with, and it answers worse."""
    if (run_dir / "model").is_dir():
        lines = ["or with plain transformers (the whole trained model, no adapter):", "", "```python",
                 "from transformers import AutoModelForCausalLM",
                 f'model = AutoModelForCausalLM.from_pretrained("{run_dir / "model"}")']
    else:
        quantized, argument = quantized_base_loading(bnb_kwargs(quantization))
        if quantization is not None and quantization.keep_modules:
            quantized.append("# this run also kept some layers unquantized: `peftkit export RUN --format adapter` "
                             "writes the exact loading code")
        lines = ["or with plain peft:", "", "```python", "from peft import AutoPeftModelForCausalLM", *quantized,
                 f'model = AutoPeftModelForCausalLM.from_pretrained("{run_dir / "adapter"}"{argument})']
    if not system_prompt:
        return [*lines, "```", ""]
    prompt = json.dumps(system_prompt, ensure_ascii=False)
    return [*lines[:3], "from transformers import AutoTokenizer", *lines[3:],
            f'tokenizer = AutoTokenizer.from_pretrained("{run_dir / "tokenizer"}")',
            f'messages = [{{"role": "system", "content": {prompt}}}, {{"role": "user", "content": "Your question"}}]',
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
            "return_dict=True)",
            "reply = model.generate(**inputs, max_new_tokens=200)[0][inputs[\"input_ids\"].shape[1]:]",
            "print(tokenizer.decode(reply, skip_special_tokens=True))", "```", "",
            f"The model was trained with the system prompt {prompt}: send it as the first message, as above and as "
            "`peftkit chat` does (without it the chat template may add a default system prompt of its own, which "
            "the model was not trained with, and it answers worse).", ""]


def _replay_row(recipe: Recipe, summary: dict[str, Any]) -> list[str]:
    replay, stats = recipe.data.replay, summary.get("data_stats", {})
    if replay is None or not stats.get("replay_examples"):
        return []
    from peftkit.data.replay import answers_from_base

    how = [f"`{replay.path}`", f"{stats['replay_examples']} rows",
           ("base model's answers" + (" (those agreeing with the written ones)" if replay.known_only else ""))
           if answers_from_base(replay.path, replay.answers) else "answers as written",
           *(["distilled (top-20)"] if replay.distill else []),
           *([f"with {stats['replay_contrast_prompts']} training prompts asked without the system prompt (contrast)"]
             if stats.get("replay_contrast_prompts") else [])]
    return [f"| replay (in the examples) | {', '.join(how)} |"]


def _quantization_text(quant: dict[str, Any] | None) -> str:
    """What the base was quantized with: 8-bit is LLM.int8, whatever 4-bit keys an older summary recorded with it."""
    if not quant:
        return "none"
    if quant["bits"] == 8:
        return "8-bit (LLM.int8)"
    return f"{quant['bits']}-bit {quant.get('quant_type', '')}".strip()


def write_model_card(run_dir: Path, recipe: Recipe, summary: dict[str, Any]) -> None:
    quant_text = _quantization_text(summary.get("quantization"))
    lines = [
        f"# {summary['recipe']}: {_what_was_trained(run_dir, recipe)} {recipe.model.name}",
        "",
        recipe.description or "Trained with peftkit.",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{recipe.model.name}` |",
        f"| method | {method_label(recipe.adapter)} |",
        f"| quantization | {quant_text} |",
        f"| train data | {', '.join(f'`{Path(s).name}`' for s in data_sources(recipe.data.train))} "
        f"({_examples(summary)}{_split_note(recipe, summary)}) |",
        *_replay_row(recipe, summary),
        f"| trainable parameters | {summary['trainable_params']:,} of {summary['total_params']:,} ({100 * summary['trainable_share']:.3f}%)"
        + unfrozen_at_end(summary) + " |",
        f"| steps / supervised tokens | {summary['steps']}{stopping_note(summary)} / {summary['trained_tokens']:,} |",
        f"| speed | {tokens_rate(summary['tokens_per_second'])} supervised tokens/s on {summary['device']} ({_workers(summary)}) |",
        f"| training time | {summary['train_seconds']:.0f} s |",
        "",
        "## Results",
        "",
        "| metric | before | after |",
        "|---|---|---|",
        f"| eval loss | {_loss(summary['eval_loss_before'])} | {_loss(summary['eval_loss_after'])} |",
        *([f"| held-out fact accuracy | {_pct(summary['heldout_accuracy_before'])} | "
           f"{_pct(summary['heldout_accuracy_after'])} |"] if summary.get("heldout_questions") else []),
        *(["", "Overfitting warning: the eval loss rose while the train loss kept falling (`plots/loss.png`)."]
          if summary.get("overfitting_warning") else []),
        *(["", f"Warning: {worse}."] if (worse := eval_loss_rose(summary)) else []),
        "",
        *_eval_section(run_dir),
        "## Use",
        "",
        "```bash",
        f"peftkit chat {shlex.quote(str(run_dir))}",
        "```",
        "",
        *_plain_use(run_dir, recipe.data.system_prompt, _trained_quantization(run_dir, recipe)),
        ("Files: `model/` (the whole trained model), " if (run_dir / "model").is_dir() else "Files: `adapter/` (PEFT layout), ")
        + "`tokenizer/`, `recipe.yaml` (resolved recipe), `metrics.jsonl`, `tensorboard/`, "
        + ("`plots/loss.png`, " if (run_dir / "plots" / "loss.png").is_file() else "")
        + "`summary.json`"
        + (", `heldout.jsonl` (per-question replies)." if (run_dir / "heldout.jsonl").is_file() else "."),
        "",
    ]
    atomic_write_text(run_dir / "README.md", "\n".join(lines))
