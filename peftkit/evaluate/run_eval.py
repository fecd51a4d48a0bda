"""`peftkit eval RUN_DIR`: loss, held-out fact accuracy and forgetting, before vs after tuning.

Forgetting is measured on a small built-in general-knowledge set (capitals, arithmetic, simple
instructions) that the default base model answers correctly: the drop in its accuracy from the base
model (adapter switched off, or loaded again for full / partial runs) to the tuned one is what
tuning cost in general ability. Questions the base model answers only through a near-tie flip under
any change of the weights; the score is also given over the ones it answers confidently (`margins`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from importlib import resources
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Literal

from peftkit.data.build import HeldoutItem, Row, load_heldout, tokenize_examples, train_eval_examples
from peftkit.data.chat import heldout_tools_problem, with_system_prompt
from peftkit.config.schema import Recipe
from peftkit.data.formats import Example, has_columns_advice, load_examples
from peftkit.errors import DataError, PeftkitError
from peftkit.evaluate.generation import answer_items, heldout_accuracy, score_replies
from peftkit.evaluate.loss import mean_loss, perplexity
from peftkit.evaluate.margins import CONFIDENT_MARGIN, confidently_known, decision_margins
from peftkit.runs import (QLORA_BASES, LoadedRun, load_base_model, load_run, read_run_recipe, read_run_tokenizer,
                          require_chat_run)
from peftkit.utils.atomic import atomic_write_text, write_problem
from peftkit.utils.once import as_command
from peftkit.utils.readable_json import readable_json

GENERAL_SET = "general_knowledge.jsonl"
REPORT = "eval.json"
ORIGINAL_BASE_REPORT = "eval_original_base.json"  # --qlora-base original: beside the as-trained report
RUN_EVAL_SPLIT = "the run's eval split"
"""`eval_data` of a report whose loss was measured on the eval examples training used (no --data)."""

log = logging.getLogger(__name__)


def builtin_resource(name: str) -> Path:
    return Path(str(resources.files("peftkit.resources") / name))


@contextlib.contextmanager
def model_before_tuning(run: LoadedRun) -> Iterator[Any]:
    """The run's adapter switched off, or for full / partial runs (which saved the whole tuned model)
    the base model loaded again: "before" must never be the tuned weights."""
    from peftkit.adapters import base_model_view, prepare_for_generation, uses_peft

    model = run.model
    if uses_peft(model):
        with base_model_view(model):
            yield model
        return
    base = load_base_model(run.run_dir, run.recipe, str(next(model.parameters()).device.type))
    prepare_for_generation(base)
    base.eval()
    yield base


def asked_in_role(items: list[HeldoutItem], system_prompt: str | None) -> list[HeldoutItem]:
    """`items` asked with the recipe's system prompt (none without one): what the domain chatbot's users see."""
    if not system_prompt:
        return []
    return [HeldoutItem(tuple(with_system_prompt(i.messages, system_prompt)), i.key_facts, i.tools) for i in items]


def eval_data_examples(data: str, recipe: Recipe, run_dir: Path) -> list[Example]:
    """`--data` read as the run's recipe reads its data (`data.columns` / `data.format`), or with format detection
    where it does not fit them: a file in a standard layout needs no map. Where neither reads it, the error of the
    reading that recognised the records is the one to fix."""
    fmt, columns = recipe.data.format, recipe.data.columns
    if fmt == "auto" and columns is None:
        return load_examples(data)
    setting = "data.columns map" if columns is not None else f"data.format ({fmt})"
    try:
        return load_examples(data, fmt, columns)
    except DataError as mapped:
        try:
            examples = load_examples(data)
        except DataError as detected:
            if not has_columns_advice(str(detected)):  # a standard layout with a mistake, or an unreadable file
                raise
            raise DataError(f"--data {data} is in no standard layout (chat, ShareGPT, alpaca, prompt/completion, "
                            f"question/answer), so it was read with the run's {setting} (from "
                            f"{run_dir / 'recipe.yaml'}), and that fails: {mapped}\nWrite it in one of those layouts, or with the fields the "
                            "run's recipe names") from None
        log.info("%s does not fit the run's %s; its format was detected instead", data, setting)
        return examples


def warn_if_trained_on(examples: list[Example], data: str, recipe: Recipe, run_dir: Path) -> None:
    """`--data` holding examples the run trained on: their loss measures memorisation (training says so of its own
    eval data; eval said nothing). Training files that are gone or unreadable now are passed over."""
    from peftkit.data.build import content_key

    try:
        with _quiet("peftkit.data"):
            trained = {content_key(e) for e in train_eval_examples(recipe.data, recipe.train.seed)[0]}
    except PeftkitError:
        return
    seen = [e.where for e in examples if content_key(e) in trained]
    if seen:
        log.warning("%d of %d examples of --data %s are ones %s trained on (first: %s): their loss measures "
                    "memorisation, not how the model does on new data; measure it on examples the run did not train "
                    "on (without --data: the run's own eval data)", len(seen), len(examples), data, run_dir, seen[0])


def run_eval_rows(run_dir: Path, recipe: Recipe, tokenizer: Any) -> list[Row]:
    """The run's eval rows, as training made them (its training rows are not needed, nor warned about again).

    An eval split of the training files is drawn from them as they are now: where they changed since the run (the
    split fingerprint in before.json), the split would hold other examples, some of them ones the run trained on, so
    it is refused before any weights load. Only the train and eval files are read: the held-out and replay files
    the recipe names may have moved (`--heldout` replaces the one)."""
    from peftkit.data.build import split_fingerprint
    from peftkit.data.files import missing_local_files
    from peftkit.train.run_dir import load_before

    cfg, seed = recipe.data, recipe.train.seed
    for key, value in (("data.eval", cfg.eval), ("data.train", cfg.train)):
        gone = missing_local_files(value)
        if gone:
            raise DataError(f"the run's eval data needs {gone[0]} ({key} in {run_dir / 'recipe.yaml'}), which is gone; "
                            "pass --data FILE to measure the loss on a file, or put it back")
    with _quiet("peftkit.data"):  # training reported what these files hold (duplicates, overlaps, ...)
        train_examples, eval_examples = train_eval_examples(cfg, seed)
    trained_on = load_before(run_dir).get("split_fingerprint")  # None: a run from before it was kept
    if not cfg.eval and cfg.eval_fraction > 0 and trained_on is not None \
            and split_fingerprint(train_examples, eval_examples) != trained_on:
        raise DataError(
            f"the training data changed since {run_dir} was trained (a file of data.train was edited or added to), "
            "so its eval split cannot be rebuilt: drawn from the data as it is now, it would hold other examples, "
            "some of them ones the run trained on. Pass --data FILE to measure the loss on a file, or restore the "
            "training data")
    rows = tokenize_examples(eval_examples, tokenizer, cfg.max_seq_len, cfg.system_prompt, what="eval example",
                             refused_when_empty=True)[0]
    if eval_examples and not rows:  # the eval file changed since the run (a split is checked above)
        raise DataError(f"the run's eval data: none of its {len(eval_examples)} examples has a supervised token left "
                        f"within data.max_seq_len={cfg.max_seq_len} tokens, so there is no loss to measure; pass "
                        "--data FILE with shorter conversations")
    return rows


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)


@as_command
def evaluate_run(
    run_dir: str | Path,
    *,
    data: str | None = None,
    heldout: str | None = None,
    general: str | None = None,
    max_new_tokens: int | None = None,
    compare_base: bool = True,
    qlora_base: Literal["quantized", "original"] = "quantized",
    out: str | Path | None = None,
) -> dict[str, Any]:
    """`qlora_base="original"` evaluates a QLoRA adapter on the unquantized base weights (before and
    after), as a serving engine that loads the adapter onto the original model runs it. The report goes
    to `out`, by default RUN_DIR/eval.json (eval_original_base.json for the original weights); writing
    RUN_DIR/eval.json also refreshes the run's model card (README.md), which shows it.
    `max_new_tokens`: reply length (None: the recipe's eval.max_new_tokens)."""
    if qlora_base not in QLORA_BASES:
        raise ValueError(f"qlora_base must be `quantized` or `original`, got {qlora_base!r}")
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise PeftkitError(f"max_new_tokens must be a whole number of at least 1, got {max_new_tokens!r}; leave it "
                           "out (None) for the recipe's eval.max_new_tokens")
    run_dir = Path(run_dir).expanduser().resolve()  # the report and the card name it by a path that works anywhere
    recipe = read_run_recipe(run_dir)
    require_chat_run(recipe, run_dir, "eval")
    # The report goes here; a path that cannot take it is said now, not after the evaluation.
    default = run_dir / (REPORT if qlora_base == "quantized" else ORIGINAL_BASE_REPORT)
    target = Path(out).expanduser() if out else default
    if target.is_dir():
        raise PeftkitError(f"--out {out} is a folder; give the report's file name, e.g. {Path(out) / REPORT}")
    problem = write_problem(target)
    if problem:
        raise PeftkitError(f"cannot write the report to {target}: {problem}; pass --out FILE in a folder you can "
                           "write")
    target.parent.mkdir(parents=True, exist_ok=True)
    system = recipe.data.system_prompt
    # the files named on the command line are read (and their mistakes reported) before any weights load
    examples = eval_data_examples(data, recipe, run_dir) if data else None
    if examples is not None and data is not None:
        warn_if_trained_on(examples, data, recipe, run_dir)
    heldout_path = heldout or recipe.data.heldout
    if heldout is None and heldout_path and not Path(heldout_path).is_file():
        raise DataError(f"the run's held-out questions {heldout_path} (data.heldout in {Path(run_dir) / 'recipe.yaml'}) "
                        "are gone; pass --heldout FILE, or put the file back")
    items = load_heldout(heldout_path, system) if heldout_path else []
    general_items = load_heldout(general or builtin_resource(GENERAL_SET), None, warn_given_away=general is not None,
                                 what="general-set")
    # The same questions asked in the recipe's role (its system prompt): what the domain chatbot's users see.
    in_role_items = asked_in_role(general_items, system)
    tokenizer = read_run_tokenizer(run_dir, recipe.model)
    tools_problem = heldout_tools_problem(tokenizer, items, system)
    if tools_problem:
        raise DataError(f"{heldout_path}: {tools_problem}")
    # the eval split is checked against the data the run trained on before the weights load
    split_rows = run_eval_rows(run_dir, recipe, tokenizer) if examples is None else None

    run = load_run(run_dir, quantized_base=qlora_base == "quantized")
    model, tokenizer = run.model, run.tokenizer
    new_tokens = max_new_tokens if max_new_tokens is not None else recipe.eval.max_new_tokens
    batch = recipe.eval.batch_size

    if examples is not None:
        rows, _ = tokenize_examples(examples, tokenizer, recipe.data.max_seq_len, system, what="eval example",
                                    refused_when_empty=True)
        if not rows:
            raise DataError(f"{data}: no example has any supervised token left within data.max_seq_len="
                            f"{recipe.data.max_seq_len} tokens, so there is no loss to measure")
    else:
        rows = split_rows or []

    def measure(model: Any, base: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = {}
        if rows:
            loss = mean_loss(model, rows, tokenizer.pad_token_id,
                             progress=f"{'base model' if base else 'eval'} loss ({len(rows)} rows)")
            result.update(loss=loss, perplexity=perplexity(loss))
        if items:
            result["heldout_accuracy"], result["heldout_details"] = heldout_accuracy(
                model, tokenizer, items, max_new_tokens=new_tokens, batch_size=batch
            )
        replies = answer_items(model, tokenizer, general_items, max_new_tokens=new_tokens, batch_size=batch,
                               label="general questions")
        result["general_accuracy"], result["general_details"] = score_replies(general_items, replies)
        if base:
            result["general_margins"] = decision_margins(model, tokenizer, general_items, replies)
        if in_role_items:
            result["general_in_role_accuracy"], result["general_in_role_details"] = heldout_accuracy(
                model, tokenizer, in_role_items, max_new_tokens=new_tokens, batch_size=batch,
                label="general questions in role"
            )
        return result

    after = measure(model)
    before: dict[str, Any] = {}
    if compare_base:
        with model_before_tuning(run) as base:
            before = measure(base, base=True)
    report = {
        "run_dir": str(run.run_dir),
        "base_weights": "original (unquantized)" if qlora_base == "original" else "as trained",
        "eval_examples": len(rows),
        "eval_data": str(Path(data).expanduser().resolve()) if data else RUN_EVAL_SPLIT,
        "max_new_tokens": new_tokens,
        "heldout_questions": len(items),
        "heldout_set": str(Path(heldout_path).expanduser().resolve()) if heldout_path else None,
        "general_questions": len(general_items),
        "general_set": str(Path(general).expanduser().resolve()) if general else f"built-in ({GENERAL_SET})",
        "before": {k: v for k, v in before.items() if not k.endswith(("_details", "_margins"))},
        "after": {k: v for k, v in after.items() if not k.endswith("_details")},
        "forgetting_points": _points_lost(before, after, "general_accuracy"),
        "forgetting_in_role_points": _points_lost(before, after, "general_in_role_accuracy"),
        **_confident_forgetting(before, after),
        "details": {k: v for k, v in after.items() if k.endswith("_details")},
    }
    # The as-trained report (the one the model card shows) is never overwritten by the other view.
    atomic_write_text(target, readable_json(report, indent=2))
    if target.resolve() == run_dir / REPORT:
        _refresh_model_card(run_dir, recipe)
    return report


def _refresh_model_card(run_dir: Path, recipe: Recipe) -> None:
    """The card of a finished run (one with summary.json) shows its eval.json: written again with the new one."""
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        from peftkit.train.model_card import write_model_card

        write_model_card(run_dir, recipe, json.loads(summary_path.read_text(encoding="utf-8")))


def lost_points(points: float) -> str:
    """Forgetting in words: `lost 36.4 points` (a `+36.4` read as a gain), or `gained 3.0 points`."""
    return f"gained {-points:.1f} points" if points < 0 else f"lost {points:.1f} points"


def _confident_forgetting(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Forgetting over the general questions the base model answers confidently, and each question's base
    margin in the tuned model's details (a near-tie there explains a loss that is chance, not forgetting)."""
    margins = before.get("general_margins")
    if margins is None:
        return {"general_confident_questions": None, "confident_margin_nats": None, "forgetting_confident_points": None}
    for detail, base_detail, margin in zip(after["general_details"], before["general_details"], margins, strict=True):
        detail.update(base_correct=base_detail["correct"], base_margin=None if margin is None else round(margin, 3))
    confident = confidently_known(margins)
    lost = sum(not after["general_details"][i]["correct"] for i in confident)
    return {"general_confident_questions": len(confident), "confident_margin_nats": round(CONFIDENT_MARGIN, 4),
            "forgetting_confident_points": round(100 * lost / len(confident), 2) if confident else None}


def _points_lost(before: dict[str, Any], after: dict[str, Any], key: str) -> float | None:
    """Accuracy points lost; None where the base model answers none of the questions (nothing to forget)."""
    return round(100 * (before[key] - after[key]), 2) if before.get(key) and key in after else None


def print_eval_report(console: Any, report: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    title = f"eval: {report['run_dir']}"
    if report.get("base_weights", "as trained") != "as trained":
        title += f" (adapter on the {report['base_weights']} base weights)"
    table = Table(title=Text(title))
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("tuned", justify="right")
    rows = [("loss", "loss", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}"),
            (f"held-out fact accuracy ({report['heldout_questions']} q)", "heldout_accuracy", "{:.1%}"),
            (f"general knowledge ({report['general_questions']} q)", "general_accuracy", "{:.1%}"),
            ("  asked with the system prompt", "general_in_role_accuracy", "{:.1%}")]
    for label, key, pattern in rows:
        before, after = report["before"].get(key), report["after"].get(key)
        if before is None and after is None:
            continue
        table.add_row(label, "n/a" if before is None else pattern.format(before), "n/a" if after is None else pattern.format(after))
    console.print(table)
    if report["before"].get("general_accuracy") == 0:
        console.print(f"forgetting: n/a (the base model answers none of the {report['general_questions']} general "
                      "questions: there is nothing to forget; pass --general with questions it knows)")
    elif report["forgetting_points"] is not None:
        console.print(f"forgetting: {lost_points(report['forgetting_points'])} of general-knowledge accuracy"
                      + (f" ({lost_points(report['forgetting_in_role_points'])} asked with the system prompt)"
                         if report.get("forgetting_in_role_points") is not None else ""))
    if report.get("forgetting_confident_points") is not None:
        console.print(f"  {lost_points(report['forgetting_confident_points'])} on the {report['general_confident_questions']} "
                      "questions the base model answers confidently (each token up to the fact at least twice as "
                      "likely as the runner-up); the others hinge on a near-tie that any weight change can flip")
