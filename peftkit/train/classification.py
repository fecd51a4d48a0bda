"""`task: sequence_classification`: a new classification head on the model, trained with the Trainer's loss.

The model comes from `AutoModelForSequenceClassification` (`num_labels` from the training
labels), the head is new. With LoRA/IA3 peft trains the head fully (`modules_to_save`: it adds
`classifier`/`score` itself) and the body through the adapter; with `partial` the body is
frozen except its top blocks; `full` trains everything. The loss is the model's own
cross-entropy (no causal shift, no sparse logits): the Trainer's own loss, in peftkit's `RunTrainer`.

The run directory has the same shape as a causal run, plus `labels.json` (id -> name, also in
the model config as id2label/label2id); summary.json reports accuracy and macro-F1 on the eval
split and on `data.heldout` (same `{text, label}` format), before and after training.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch

from peftkit.adapters import (
    base_model_view, build_adapter, effective_quantization, keep_trained_weights_in_float32, parameter_counts,
    trainer_extras,
)
from peftkit.adapters.lora import CALIBRATED_INITS, KNOWLEDGE_INITS
from peftkit.config.load import recipe_to_yaml
from peftkit.config.schema import Recipe, method_label
from peftkit.config.validate import validate_recipe
from peftkit.data.classification import (
    LABELS_FILE,
    ClassificationData,
    build_classification_data,
    general_inputs,
    label_config,
    label_names,
    load_labeled,
    read_labels,
)
from peftkit.errors import DataError
from peftkit.evaluate.classification import metrics_from_eval_prediction
from peftkit.models import load_model, resolve_device, resolve_dtype, resolve_model_ref, weights_dtype
from peftkit.models.load import loading_errors
from peftkit.models.resolve import ModelSource, materialize
from peftkit.train import checkpoints, disk_space, signals
from peftkit.train.callbacks import (
    CheckpointBoundaries, MetricsJsonlCallback, ResumedSettings, RunTotals, early_stopping_callbacks, per_second, use_progress_bar,
)
from peftkit.utils.threads import choose_threads, omp_threads
from peftkit.train.run import (
    RunResult, _session_loss_sum, _weights_step, check_device_options, peak_memory_mb, save_adapter, summary_header,
    tensorboard_callback, totals_so_far, train_or_finish, training_arguments, write_loss_plot,
)
from peftkit.train.model_card import stopping_note
from peftkit.train.report import unfrozen_at_end
from peftkit.train.trainer import RunTrainer
from peftkit.train.run_dir import check_run_dir, clear_run_dir, load_before, mark_run_dir, run_lock, save_before
from peftkit.utils.atomic import atomic_write_text
from peftkit.utils.modes import eval_mode, padding_side
from peftkit.utils.readable_json import readable_json

log = logging.getLogger(__name__)

TASK = "sequence_classification"


class ClassificationTrainer(RunTrainer):
    """The default Trainer loss (the model's cross-entropy); counts the input tokens it trains on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.input_tokens_seen = 0
        # `*ForSequenceClassification.forward` takes **kwargs, so the Trainer takes its loss for one already divided
        # over the accumulation window and skips its own `/ grad_accum`; but that loss is the batch's plain mean, and
        # the loss, gradients and clipping were grad_accum times too large.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        if model.training and "attention_mask" in inputs:
            self.input_tokens_seen += int(inputs["attention_mask"].sum())
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


def load_classification_tokenizer(recipe: Recipe, source: ModelSource) -> Any:
    """The model's own tokenizer, with a pad token (no chat template: inputs are plain text)."""
    from transformers import AutoTokenizer

    with loading_errors(source, "the tokenizer of"):
        tokenizer = AutoTokenizer.from_pretrained(
            materialize(source), revision=source.revision, trust_remote_code=recipe.model.trust_remote_code
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def model_input_names(model: Any) -> set[str]:
    """Inputs the underlying transformers model accepts (filters token_type_ids for decoders)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters) & {"input_ids", "attention_mask", "token_type_ids"}


MAX_SEQ_LEN_ATTR = "peftkit_max_seq_len"
"""Set by `peftkit.runs.load_run` on a classifier: the run's data.max_seq_len, where its scores cut the texts."""


@torch.inference_mode()
def predict_labels(model: Any, tokenizer: Any, texts: list[str], max_seq_len: int | None = None,
                   batch_size: int = 16) -> list[str]:
    """Label names for raw texts (used for the run's sample predictions and by callers of load_run). Texts are cut
    at `max_seq_len` tokens: by default the run's data.max_seq_len for a model from load_run (so the predictions
    match the run's scores), else 512."""
    max_seq_len = max_seq_len or getattr(model, MAX_SEQ_LEN_ATTR, None) or 512
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    id2label = base.config.id2label
    accepted = model_input_names(model)
    device = next(model.parameters()).device
    out: list[str] = []
    with eval_mode(model), padding_side(tokenizer, tokenizer.padding_side):  # the saved tokenizer keeps no padding
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], truncation=True, max_length=max_seq_len, padding=True, return_tensors="pt")
            logits = model(**{k: v.to(device) for k, v in batch.items() if k in accepted}).logits
            out.extend(id2label[int(i)] for i in logits.argmax(-1).tolist())
    return out


SCORES = ("loss", "accuracy", "macro_f1")


def _picked(metrics: dict[str, Any] | None, prefix: str) -> dict[str, float | None]:
    return {key: (metrics or {}).get(f"{prefix}_{key}") for key in SCORES}


def _scores(trainer: RunTrainer, rows: list[dict[str, Any]], prefix: str) -> dict[str, float | None]:
    return _picked(trainer.evaluate(rows, metric_key_prefix=prefix) if rows else None, prefix)


def _final_scores(trainer: RunTrainer, rows: list[dict[str, Any]], prefix: str) -> dict[str, float | None]:
    """The saved weights' scores, logged only where they belong. With early stopping the best checkpoint's weights
    were loaded: its evaluation is reused, as is one at the last step (logged again at the last step, it drew a
    false point on the loss curve). Other splits (held-out) are scored without a log record."""
    if not rows:
        return _picked(None, prefix)
    step = _weights_step(trainer, trainer.state.global_step)
    logged = next((entry for entry in reversed(trainer.state.log_history)
                   if entry.get("step") == step and f"{prefix}_loss" in entry), None)
    if logged is not None:
        return _picked(logged, prefix)
    if prefix == "eval" and step == trainer.state.global_step:
        return _scores(trainer, rows, prefix)  # the last step's weights, logged at the last step
    return _picked(trainer.predict(rows, metric_key_prefix=prefix).metrics, prefix)


def write_classification_card(run_dir: Path, recipe: Recipe, summary: dict[str, Any]) -> None:
    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    weights = "model/ (full weights)" if (run_dir / "model").is_dir() else "adapter/ (PEFT layout, head in modules_to_save)"
    lines = [
        f"# {summary['recipe']}: {method_label(recipe.adapter)} classifier on {recipe.model.name}",
        "",
        recipe.description or "Trained with peftkit.",
        "",
        f"Labels: {', '.join(summary['labels'])}. Trainable parameters: {summary['trainable_params']:,} of "
        f"{summary['total_params']:,} ({100 * summary['trainable_share']:.3f}%){unfrozen_at_end(summary)}, "
        f"{summary['steps']} steps{stopping_note(summary)}, "
        f"{summary['train_seconds']:.0f} s on {summary['device']}.",
        "",
        "| split | metric | before | after |",
        "|---|---|---|---|",
    ]
    for split in ("eval", "heldout"):
        for metric in ("accuracy", "macro_f1", "loss"):
            before, after = summary.get(f"{split}_{metric}_before"), summary.get(f"{split}_{metric}_after")
            if after is not None:
                lines.append(f"| {split} | {metric} | {fmt(before)} | {fmt(after)} |")
    lines += ["", "## Use", "", "```python", "from peftkit.runs import load_run",
              "from peftkit.train.classification import predict_labels", "", f'run = load_run("{run_dir}")',
              'print(predict_labels(run.model, run.tokenizer, ["Your text"]))', "```", ""]
    if (run_dir / "model").is_dir():
        lines += ["or with plain transformers (the whole trained model; its config names the labels):", "", "```python",
                  "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
                  f'model = AutoModelForSequenceClassification.from_pretrained("{run_dir / "model"}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{run_dir / "tokenizer"}")', "```", ""]
    lines += [f"Files: {weights}, `tokenizer/`, `labels.json`, `recipe.yaml`, `metrics.jsonl`, `summary.json`.", ""]
    atomic_write_text(run_dir / "README.md", "\n".join(lines))


def train_classifier(
    recipe: Recipe, *, resume: bool = False, force: bool = False, extra_callbacks: list[Any] | None = None
) -> RunResult:
    run_dir = Path(recipe.output_dir).expanduser().resolve()
    # one process only (multi-process classification is refused by the launcher)
    with run_lock(run_dir), signals.FinishingGuard(run_dir) as finishing, contextlib.ExitStack() as cleanup:
        return _train_classifier(recipe, run_dir, resume=resume, force=force, extra_callbacks=extra_callbacks,
                                 finishing=finishing, cleanup=cleanup)


def _train_classifier(
    recipe: Recipe, run_dir: Path, *, resume: bool, force: bool, extra_callbacks: list[Any] | None,
    finishing: signals.FinishingGuard | None = None, cleanup: contextlib.ExitStack | None = None,
) -> RunResult:
    started = time.perf_counter()
    recipe = validate_recipe(recipe, check_model=True)
    replace_earlier = check_run_dir(run_dir, resume=resume, force=force, recipe_dump=recipe.model_dump(mode="json"))

    from transformers import DataCollatorWithPadding, set_seed

    device = resolve_device(recipe.train.device)
    threads = choose_threads(recipe.train.num_threads or omp_threads(), "training", "train.num_threads",
                             on_cpu=device == "cpu")
    set_seed(recipe.train.seed)
    dtype = resolve_dtype(recipe.train.dtype, device)
    check_device_options(recipe.train, device)
    source = resolve_model_ref(recipe.model.name, revision=recipe.model.revision, allow_pickle=recipe.model.allow_pickle)
    tokenizer = load_classification_tokenizer(recipe, source)
    labels = label_names(load_labeled(recipe.data.train, recipe.data.columns))
    if resume and (run_dir / LABELS_FILE).is_file():  # the ids the checkpoint's head was trained with
        recorded = read_labels(run_dir)
        if sorted(recorded) != sorted(labels):
            raise DataError(f"the training labels changed since {run_dir} started ({', '.join(recorded)} -> "
                            f"{', '.join(labels)}): a resumed head cannot take them; train afresh with --force")
        labels = recorded
    quantization = effective_quantization(recipe)
    model = load_model(recipe.model, quantization, device=device, dtype=weights_dtype(dtype, trains_model_weights=True),  # the head
                       task=TASK, num_labels=len(labels), source=source)
    label_config(model, labels, tokenizer.pad_token_id)
    data: ClassificationData = build_classification_data(recipe.data, tokenizer, recipe.train.seed, model_input_names(model),
                                                         labels)
    disk_space.check_whole_model_fits(run_dir, model, recipe, tokenizer, replacing=replace_earlier)
    if replace_earlier:  # the data is usable: only now may an earlier run in output_dir make way (--force)
        clear_run_dir(run_dir)
    if not resume:
        mark_run_dir(run_dir, recipe_to_yaml(recipe))
    atomic_write_text(
        run_dir / LABELS_FILE,
        readable_json({"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}, indent=2),
    )
    init = getattr(recipe.adapter, "init", None)
    calibration = None  # rows for the data-driven inits (EVA, CorDA); only their input_ids are used
    if init in KNOWLEDGE_INITS:
        calibration = general_inputs(tokenizer, recipe.data.max_seq_len)
    elif init in CALIBRATED_INITS:
        calibration = [{"input_ids": row["input_ids"]} for row in data.train]
    model = build_adapter(model, recipe.adapter, task=TASK, quantized=quantization is not None, calibration=calibration)
    keep_trained_weights_in_float32(model, dtype, device, deepspeed=recipe.deepspeed is not None)
    trainable, total = parameter_counts(model)
    log.info("Trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    has_eval = bool(data.eval)
    metrics_path = run_dir / "metrics.jsonl"
    if not resume:
        metrics_path.unlink(missing_ok=True)
    args = training_arguments(recipe, run_dir, device, dtype, has_eval)
    disk_space.check_before_training(run_dir, model, recipe, tokenizer, args, rows=len(data.train), world_size=1, resume=resume)
    # the causal path's writer: one event file in RUN_DIR/tensorboard, the final evaluation included
    resuming_at = checkpoints.latest_loadable(run_dir) if resume else None
    tensorboard = tensorboard_callback(run_dir / "tensorboard", resuming_at)
    if cleanup is not None:  # closed however the run ends
        cleanup.callback(tensorboard.close)
    extras = trainer_extras(model, recipe.adapter, args)
    callbacks = [
        *extras.callbacks,  # first: they add trainable counts to the log records the next ones write
        RunTotals(lambda: run_totals(), interrupted=lambda: interrupt.interrupted),  # the end record is the run's
        MetricsJsonlCallback(metrics_path),
        tensorboard,
        checkpoints.CompleteMarkerCallback(keep=recipe.train.save_total_limit, progress=lambda: run_progress()),
        checkpoints.SeededLengthGrouping(),
        ResumedSettings(),
        interrupt := signals.interrupt_callback(),  # Ctrl-C: checkpoint at the end of the step, then stop
        *(extra_callbacks or []),
    ]
    callbacks += [*early_stopping_callbacks(recipe.train.early_stopping_patience, has_eval), CheckpointBoundaries()]
    trainer = ClassificationTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval or None,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=metrics_from_eval_prediction(len(data.labels)),
        callbacks=callbacks,
        optimizers=(extras.optimizer, None),
        hashed_dropout=recipe.train.hashed_dropout,
    )
    use_progress_bar(trainer)
    before: dict[str, dict[str, float | None]] = {"eval": {}, "heldout": {}}
    if recipe.eval.before and not resume:
        with base_model_view(model):
            before = {"eval": _scores(trainer, data.eval, "eval"), "heldout": _scores(trainer, data.heldout, "heldout")}

    if resume:  # measured when the run started
        before = load_before(run_dir).get("classification") or before
    else:
        save_before(run_dir, {"classification": before})

    resume_from = checkpoints.prepare_resume(run_dir) if resume else None
    prior = (checkpoints.read_progress(resume_from) if resume_from else None) or checkpoints.Progress()
    trainer.input_tokens_seen = prior.input_tokens

    def run_progress() -> checkpoints.Progress:
        """The whole run's totals so far, recorded with each checkpoint (a resumed summary covers every session)."""
        return checkpoints.Progress(
            supervised_tokens=trainer.input_tokens_seen, input_tokens=trainer.input_tokens_seen,
            train_seconds=prior.train_seconds + time.perf_counter() - train_started,
            loss_sum=prior.loss_sum + _session_loss_sum(trainer), steps=trainer.state.global_step,
            wall_seconds=prior.wall_seconds + time.perf_counter() - started,
            eval_seconds=prior.eval_seconds + trainer.eval_seconds_in_training)

    def run_totals() -> tuple[float, float]:
        return totals_so_far(trainer, prior, train_started)

    train_started = time.perf_counter()
    output = train_or_finish(trainer, recipe, resume_from, prior.steps, has_eval, interrupt, run_dir, finishing)
    train_loss, train_seconds = run_totals()
    eval_seconds = prior.eval_seconds + trainer.eval_seconds_in_training
    after = {"eval": _final_scores(trainer, data.eval, "eval"), "heldout": _final_scores(trainer, data.heldout, "heldout")}
    tensorboard.close()

    save_adapter(model, tokenizer, run_dir, recipe.adapter.method)  # or the trained model, and the tokenizer
    prompts = list(recipe.eval.sample_prompts)
    samples = [{"prompt": p, "reply": r} for p, r in zip(prompts, predict_labels(model, tokenizer, prompts, recipe.data.max_seq_len))]

    trainable_at_end = parameter_counts(model)[0]  # gradual unfreezing ends with more than it started with
    write_loss_plot(run_dir, recipe, output.global_step)
    summary: dict[str, Any] = {
        **summary_header(recipe, run_dir, quantization, device, dtype, threads, (trainable, total), data, output,
                         trainer.state.epoch),
        **({"trainable_params_end": trainable_at_end} if trainable_at_end != trainable else {}),
        "task": TASK,
        "labels": data.labels,
        "heldout_examples": len(data.heldout),
        "trained_tokens": trainer.input_tokens_seen,
        "input_tokens": trainer.input_tokens_seen,
        "train_seconds": round(train_seconds, 2),
        "eval_seconds_in_training": round(eval_seconds, 3),  # part of train_seconds, not of the speed
        "tokens_per_second": per_second(trainer.input_tokens_seen, train_seconds - eval_seconds),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "train_loss": round(train_loss, 5),
        "stopped_early": trainer.state.max_steps > output.global_step,
        "weights_from_step": _weights_step(trainer, output.global_step),
        "data_stats": data.stats,
        "samples": samples,
    }
    for split in ("eval", "heldout"):
        for metric in SCORES:
            summary[f"{split}_{metric}_before"] = before[split].get(metric)
            summary[f"{split}_{metric}_after"] = after[split].get(metric)
    # Keys the terminal report shares with causal runs (there: fact accuracy on held-out questions).
    summary["heldout_questions"] = len(data.heldout)
    summary["wall_seconds"] = round(prior.wall_seconds + time.perf_counter() - started, 2)  # all sessions
    atomic_write_text(run_dir / "summary.json", readable_json(summary, indent=2))
    write_classification_card(run_dir, recipe, summary)
    return RunResult(run_dir, summary)
