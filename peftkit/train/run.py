"""`peftkit train`: recipe -> model + adapter + data -> Trainer -> a self-describing run directory."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from peftkit.adapters import (
    base_model_view, build_adapter, effective_quantization, keep_trained_weights_in_float32, parameter_counts,
    trainer_extras,
)
from peftkit.config.load import load_recipe, recipe_to_yaml, revalidated
from peftkit.config.schema import Recipe, method_label
from peftkit.config.validate import paged_optimizer_advice, validate_recipe
from peftkit.data import PaddingCollator, build_datasets
from peftkit.adapters.lora import KNOWLEDGE_INITS
from peftkit.data.build import check_token_ids_fit, data_summary_line, general_rows, heldout_fingerprint
from peftkit.data.replay import answers_from_base, base_model_answerer, shared_cache_path
from peftkit.errors import ConfigError, PeftkitError, RunDirError, is_disk_full
from peftkit.train.distill import add_teacher_targets
from peftkit.evaluate.generation import generate_replies, heldout_accuracy
from peftkit.models import (
    load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_model_ref, save_tokenizer, weights_dtype,
)
from peftkit.train import checkpoints
from peftkit.train import deepspeed as deepspeed_setup, disk_space, run_dir as run_dirs, signals
from peftkit.utils.once import command_scope, say_once
from peftkit.train.launch import WORKER_ENV, dist_info, is_main_process, mean_over_processes, sum_over_processes
from peftkit.models.fingerprint import base_config_summary, source_fingerprint
from peftkit.models.skeleton import input_embedding_rows, model_skeleton
from peftkit.train.callbacks import (
    CheckpointBoundaries,
    DivergenceGuard,
    MetricsJsonlCallback,
    OverfittingWatch,
    use_progress_bar,
    ResumedSettings,
    RunTotals,
    early_stopping_callbacks,
    per_second,
    plot_loss_curves,
    read_metrics,
)
from peftkit.train.model_card import write_model_card
from peftkit.train.trainer import SFTTrainer, pad_eval_rows
from peftkit.utils.atomic import atomic_directory, atomic_write_text
from peftkit.utils.memory import peak_rss_mb
from peftkit.utils.readable_json import readable_json
from peftkit.utils.threads import choose_threads, omp_threads, say_busy_cpu_warning

log = logging.getLogger(__name__)
# bitsandbytes says what check_device_options already said, as a UserWarning with its source line, when the Trainer
# builds a paged optimizer on the CPU.
warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU", category=UserWarning)


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]


def check_device_options(cfg: Any, device: str) -> None:
    """GPU-only `train` options, checked before the model loads (transformers would refuse a pre-Ampere GPU's
    tf32 only after it; paged optimizers page nothing without CUDA, so asking for one on a CPU is worth a word)."""
    advice = paged_optimizer_advice(cfg.optimizer, device)
    if advice:
        say_once(log, logging.WARNING, advice)
    if not cfg.tf32:
        return
    if device != "cuda":
        log.warning("train.tf32 is for NVIDIA GPUs; training on %s ignores it", device)
        return
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise ConfigError(f"train.tf32 needs an Ampere or newer GPU (compute capability 8.0+); "
                          f"{torch.cuda.get_device_name()} is {major}.{minor}: remove train.tf32")


def train_or_finish(trainer: Any, recipe: Recipe, resume_from: Path | None, prior_steps: int, has_eval: bool,
                    interrupt: Any, run_dir: Path, finishing: Any, deepspeed: bool = False) -> Any:
    """Train (or, resumed after its last step, finish from that checkpoint); a signal during training stops with a
    saved checkpoint and the resume command, and from here on stops at once with the run resumable."""
    try:
        if checkpoints.trained_to_the_end(resume_from, recipe, prior_steps, has_eval, deepspeed=deepspeed):
            output = checkpoints.restore_finished(trainer, resume_from)  # every step was trained before the stop
        else:
            output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except Exception as exc:
        if is_disk_full(exc) and trainer.is_world_process_zero():
            _free_the_failed_save(run_dir)
        raise
    except KeyboardInterrupt:  # a second Ctrl-C: quit without saving
        if trainer.is_world_process_zero() and not os.environ.get(WORKER_ENV):  # --nproc: the launcher says it
            signals.say_where_it_resumes(run_dir)
        raise
    finally:  # a failed run (divergence, a callback's error, OOM) never reaches on_train_end
        interrupt.restore()
    signals.raise_if_interrupted(interrupt, trainer, run_dir)  # a signal stopped it: checkpoint saved, say how to resume
    if finishing is not None:
        finishing.arm()
    return output


def _free_the_failed_save(run_dir: Path) -> None:
    """A checkpoint that a full disk cut short can never be resumed from (`--resume` deletes it): deleting it now
    gives back its space, so the resume can start once a little more is freed, and the user is not left to guess
    which checkpoint folder is safe to delete."""
    for path in checkpoints.remove_incomplete(run_dir):
        log.warning("Removed %s: the full disk cut its save short (a checkpoint without its %s marker is never "
                    "resumed from)", path, checkpoints.MARKER)


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def training_arguments(recipe: Recipe, run_dir: Path, device: str, dtype: torch.dtype, has_eval: bool) -> Any:
    from transformers import TrainingArguments

    cfg = recipe.train
    # Early stopping keeps the best checkpoint, so checkpoints must be saved exactly when evaluating: with only
    # save_steps set, evaluation moves onto them (else the Trainer refuses the mismatch of epochs and steps).
    early_stop = bool(cfg.early_stopping_patience) and has_eval
    eval_steps = cfg.eval_steps or (cfg.save_steps if early_stop else None)
    if early_stop and cfg.save_steps and cfg.eval_steps and cfg.save_steps != cfg.eval_steps:
        log.warning("train.save_steps %d is replaced by train.eval_steps %d: early stopping keeps the best evaluation's "
                    "checkpoint, so checkpoints are saved at every evaluation", cfg.save_steps, cfg.eval_steps)
    bf16, fp16 = deepspeed_setup.precision_flags(device, dtype)
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        neftune_noise_alpha=cfg.neftune_noise_alpha,
        **({"optim": cfg.optimizer} if cfg.optimizer != "auto" else {}),
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio,  # a warm-up over every step is dropped in create_scheduler
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        logging_steps=cfg.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must show (and stop the run: DivergenceGuard), not be averaged away
        eval_strategy=("steps" if eval_steps else "epoch") if has_eval else "no",
        eval_steps=eval_steps,
        save_strategy="steps" if cfg.save_steps or (early_stop and eval_steps) else "epoch",
        save_steps=(eval_steps if early_stop and eval_steps else cfg.save_steps) or 500,
        # None: the Trainer would prune before the new checkpoint is marked complete (with early stopping's best kept,
        # the newest complete one); CompleteMarkerCallback prunes to cfg.save_total_limit once it is.
        save_total_limit=None,
        load_best_model_at_end=early_stop,
        restore_callback_states_from_checkpoint=True,  # a resumed run keeps EarlyStoppingCallback's patience count
        metric_for_best_model="eval_loss" if early_stop else None,
        greater_is_better=False if early_stop else None,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        use_cpu=device == "cpu",
        bf16=bf16,
        fp16=fp16,
        tf32=True if cfg.tf32 and device == "cuda" else None,
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # Every trainable parameter gets a gradient each step (adapters, unfrozen blocks); transformers would set True
        # for a PeftModel (not a PreTrainedModel), costing DDP a graph traversal per step.
        ddp_find_unused_parameters=False,
        dataloader_pin_memory=device == "cuda",
        disable_tqdm=False,
        **deepspeed_setup.training_kwargs(recipe, device, dtype),  # deepspeed config; gloo (CPU) / nccl backend
    )


def global_batch_size(recipe: Recipe) -> int:
    """The rows of one optimizer step over all processes."""
    return recipe.train.batch_size * recipe.train.grad_accum * dist_info().world_size


def check_chat_asks(recipe: Recipe, tokenizer: Any) -> None:
    """Held-out questions and sample prompts are asked as conversations after training: a tokenizer without a chat
    template would fail only then."""
    no_template = getattr(tokenizer, "no_template_reason", None)
    asked = [key for key, used in (("eval.sample_prompts", recipe.eval.sample_prompts), ("data.heldout", recipe.data.heldout))
             if used]
    if no_template and asked:
        raise ConfigError(f"{' and '.join(asked)} {'ask' if len(asked) > 1 else 'asks'} the model as a chat, but "
                          f"{no_template}; or remove {' and '.join(asked)}")


def check_data_fits_vocabulary(recipe: Recipe, data: Any, tokenizer: Any, source: Any) -> None:
    """Token ids past the model's embedding table, found from its weightless skeleton (before the weights load)."""
    rows = input_embedding_rows(model_skeleton(source, recipe.model, task=recipe.task))
    check_token_ids_fit(data, rows, recipe.model.name, tokenizer)


def warn_if_one_batch_holds_all(recipe: Recipe, rows: int) -> None:
    """A batch larger than the data trains smaller steps than the recipe says: said, not left to the summary's
    `global_batch_size`."""
    batch = global_batch_size(recipe)
    if rows < batch:
        log.warning("The global batch (%d = batch_size x grad_accum x processes) is larger than the %d training rows: "
                    "every optimizer step trains on all %d, so each epoch is one step; lower train.batch_size, or add "
                    "data", batch, rows, rows)


def _heldout(model: Any, tokenizer: Any, recipe: Recipe, items: list[Any]) -> tuple[float | None, list[dict[str, Any]]]:
    if not items:
        return None, []
    return heldout_accuracy(
        model, tokenizer, items, max_new_tokens=recipe.eval.max_new_tokens, batch_size=recipe.eval.batch_size
    )


def _asked(items: list[Any]) -> list[tuple[str, list[str]]]:
    """Each held-out item's question and key facts, as its record in before.json holds them."""
    return [(item.question, list(item.key_facts)) for item in items]


def _eval_loss(trainer: SFTTrainer, has_eval: bool) -> float | None:
    return float(trainer.evaluate()["eval_loss"]) if has_eval else None


def _weights_step(trainer: Any, last_step: int) -> int:
    """The step whose weights were saved: with early stopping the best evaluation's, else the last."""
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best:
        try:
            return checkpoints.step_of(Path(best))
        except ValueError:
            return last_step
    return last_step


def final_eval_loss(trainer: Any, has_eval: bool) -> float | None:
    """The shipped model's eval loss without evaluating the same weights twice: with early stopping the best
    checkpoint was loaded (its loss is the best metric); an evaluation at the last step (epoch end, eval_steps) is
    reused; only weights that were never evaluated get a new pass."""
    if not has_eval:
        return None
    state = trainer.state
    if trainer.args.load_best_model_at_end and state.best_metric is not None and state.best_model_checkpoint:
        return float(state.best_metric)
    last = next((entry for entry in reversed(state.log_history) if "eval_loss" in entry), None)
    if last is not None and last.get("step") == state.global_step:
        return float(last["eval_loss"])
    return _eval_loss(trainer, has_eval)


def tensorboard_callback(log_dir: Path, resume_from: Path | None = None) -> Any:
    """TensorBoard logging into one event file in RUN_DIR/tensorboard, the final evaluation included: the
    Trainer's callback closes its writer when training ends and would open another one, under
    checkpoints/runs/, for that last point; this one stays open until `close()`. A run resumed from the checkpoint
    `resume_from` hides what an interrupted session logged after it (event_files.trim_event_files), as metrics.jsonl
    drops it."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    from peftkit.train.event_files import trim_event_files

    class RunTensorBoard(TensorBoardCallback):
        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.tb_writer is not None:
                self.tb_writer.flush()

        def close(self) -> None:
            if self.tb_writer is not None:
                self.tb_writer.close()
                self.tb_writer = None

    resume_step = checkpoints.step_of(resume_from) if resume_from is not None else None
    if resume_from is not None and (dropped := trim_event_files(
            log_dir, resume_step, evaluated_at_step=checkpoints.evaluated_before_save(resume_from))):
        log.info("Dropped %d TensorBoard events logged after the checkpoint of step %d (logged again as training goes "
                 "on)", dropped, resume_step)
    purge = {"purge_step": resume_step + 1} if resume_step is not None else {}  # for a file that could not be trimmed
    callback = RunTensorBoard(SummaryWriter(log_dir=str(log_dir), **purge))
    callback.logging_dir = str(log_dir)
    return callback


def _session_loss_sum(trainer: Any, *, finished: bool = False) -> float:
    """Sum of this session's step losses, averaged over processes; every rank must call it. The Trainer's logged
    losses are means over processes, but the steps since the last log are still per process (`_tr_loss`), and
    its own end-of-training sum (`finished`: already in `_total_loss_scalar`) adds those of the one process alone."""
    pending = getattr(trainer, "_tr_loss", None)
    local = float(pending.item()) if hasattr(pending, "item") else 0.0
    logged = float(getattr(trainer, "_total_loss_scalar", 0.0)) - (local if finished else 0.0)
    return logged + mean_over_processes(local)


def train(
    recipe: Recipe | str | Path, *, resume: bool = False, force: bool = False, extra_callbacks: list[Any] | None = None
) -> RunResult:
    """Train `recipe` (a Recipe, or the path of a recipe file) into its output_dir, with the checks `peftkit train`
    makes: `resume` continues an unfinished run from its last checkpoint, `force` replaces an earlier run."""
    recipe = _as_recipe(recipe)
    resolve_device(recipe.train.device)  # a device this machine lacks: the one refusal, before the recipe's checks
    if resume and force:
        raise RunDirError("resume=True and force=True contradict each other: force deletes the run resume would "
                          "continue; pass one of them")
    run_dir = Path(recipe.output_dir).expanduser().resolve()
    if resume and (run_dir / "summary.json").is_file():  # resuming would only rewrite its summary and model card
        raise RunDirError(f"resume: {run_dir} holds a finished run (summary.json); there is nothing to resume")
    with (callers_settings_kept(), command_scope(),  # a notebook or sweep goes on with its own thread count and
          # random state; and the findings said once per command are said again in the next call
          deepspeed_setup.process_state_released() if recipe.deepspeed is not None else contextlib.nullcontext()):
        if recipe.task == "sequence_classification":  # own Trainer and data path (peftkit/train/classification.py)
            from peftkit.train.classification import train_classifier

            return train_classifier(recipe, resume=resume, force=force, extra_callbacks=extra_callbacks)
        return _train_causal(recipe, resume=resume, force=force, extra_callbacks=extra_callbacks)


FP32_PRECISION_BACKENDS = ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul",
                           "mkldnn.conv", "mkldnn.rnn")


def fp32_precisions() -> dict[Any, str]:
    """torch's float32 matmul / convolution precision settings (`tf32` or `ieee`), the whole and per backend, in the
    order they are set back (the whole first: setting it sets every backend)."""
    found = {}
    for name in FP32_PRECISION_BACKENDS:
        backend: Any = torch.backends
        for part in filter(None, name.split(".")):
            backend = getattr(backend, part, None)
        if backend is not None and isinstance(getattr(backend, "fp32_precision", None), str):
            found[backend] = backend.fp32_precision
    return found


@contextlib.contextmanager
def callers_settings_kept() -> Iterator[None]:
    """Training sets torch's thread count (train.num_threads) and seeds every random generator (train.seed): put
    the caller's back afterwards, however the run ends."""
    import random

    import numpy as np

    threads = torch.get_num_threads()
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    precisions = fp32_precisions()  # train.tf32 turns TF32 on for the process
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        for backend, precision in precisions.items():
            backend.fp32_precision = precision
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _train_causal(recipe: Recipe, *, resume: bool, force: bool, extra_callbacks: list[Any] | None) -> RunResult:
    run_dir = Path(recipe.output_dir).expanduser().resolve()
    # Under `peftkit train --nproc`, the launching process holds the lock for its workers.
    with (run_dirs.run_lock(run_dir, enabled=is_main_process() and not os.environ.get(WORKER_ENV)),
          signals.FinishingGuard(run_dir, main_process=is_main_process()) as finishing,
          contextlib.ExitStack() as cleanup):
        return _train(recipe, run_dir, resume=resume, force=force, extra_callbacks=extra_callbacks, finishing=finishing,
                      cleanup=cleanup)


def _as_recipe(recipe: Any) -> Recipe:
    if isinstance(recipe, Recipe):  # checked again: model_copy(update=...) skips the checks
        return revalidated(recipe)
    if isinstance(recipe, (str, Path)):  # a recipe file, read as `peftkit train FILE` reads it
        return load_recipe(recipe)
    raise TypeError(f"train() takes a Recipe (peftkit.config.load_recipe / recipe_from_dict) or the path of a recipe "
                    f"file, not {type(recipe).__name__}")


def _train(
    recipe: Recipe, run_dir: Path, *, resume: bool, force: bool, extra_callbacks: list[Any] | None,
    finishing: signals.FinishingGuard | None = None, cleanup: contextlib.ExitStack | None = None,
) -> RunResult:
    """`cleanup` closes what this opens (the TensorBoard writer) however the run ends."""
    started = time.perf_counter()
    recipe = validate_recipe(recipe, check_model=True)
    main_process = is_main_process()  # under a launcher, only global rank 0 writes the run directory
    replace_earlier = False
    if main_process:
        replace_earlier = run_dirs.check_run_dir(run_dir, resume=resume, force=force,
                                                 recipe_dump=recipe.model_dump(mode="json"))
    if resume:
        checkpoints.check_resume_setup(run_dir, world_size=dist_info().world_size,
                                       deepspeed_stage=deepspeed_setup.zero_stage(recipe))

    from transformers import set_seed

    device = resolve_device(recipe.train.device)
    threads = choose_threads(recipe.train.num_threads or omp_threads(), "training", "train.num_threads",
                             on_cpu=device == "cpu" and dist_info().world_size == 1)  # a launch sets each rank's count
    set_seed(recipe.train.seed)
    dtype = resolve_dtype(recipe.train.dtype, device)
    check_device_options(recipe.train, device)
    source = resolve_model_ref(recipe.model.name, revision=recipe.model.revision, allow_pickle=recipe.model.allow_pickle)
    tokenizer = load_tokenizer(recipe.model, source)
    check_chat_asks(recipe, tokenizer)
    data = build_datasets(recipe.data, tokenizer, recipe.train.seed)
    check_data_fits_vocabulary(recipe, data, tokenizer, source)
    fingerprint = run_dirs.data_fingerprint(data.train, data.eval)
    if resume and main_process:  # the checkpoint's data order and the eval loss before belong to the start's data
        run_dirs.check_resume_data(run_dir, fingerprint, data.split_fingerprint, [len(data.train), len(data.eval)])
    ds_config = deepspeed_setup.setup(recipe, device, dtype)  # None without DeepSpeed
    quantization = effective_quantization(recipe)
    say_busy_cpu_warning()  # kept back by choose_threads: a run refused before this says its refusal alone
    log.info("Loading %s on %s (%s%s)", recipe.model.name, device, str(dtype).removeprefix("torch."),
             f", {quantization.bits}-bit" if quantization else "")
    load_dtype = weights_dtype(dtype, trains_model_weights=recipe.adapter.method in ("full", "partial")
                               or bool(getattr(recipe.adapter, "modules_to_save", None)))
    model = load_model(recipe.model, quantization, device=device, dtype=load_dtype, source=source,
                       quant_storage=deepspeed_setup.quant_storage_dtype(recipe, dtype))
    # of the files just loaded (a hub model's weights are only there now): merge / chat warn when put on other weights
    base_fingerprint = source_fingerprint(source) if main_process else None
    if resume and main_process:
        run_dirs.check_resume_base(run_dir, base_fingerprint, recipe.model.name)
    if main_process:  # data and model are usable: only now may an earlier run in output_dir make way (--force)
        disk_space.check_whole_model_fits(run_dir, model, recipe, tokenizer, replacing=replace_earlier)
        if replace_earlier:
            run_dirs.clear_run_dir(run_dir)
        if not resume:
            run_dirs.mark_run_dir(run_dir, recipe_to_yaml(recipe))
        if ds_config is not None:
            deepspeed_setup.write_config(run_dir, ds_config)
    replay = recipe.data.replay
    if replay is not None and answers_from_base(replay.path, replay.answers):  # self-distilled replay
        answerer = base_model_answerer(
            model, tokenizer, cache=run_dir / "replay_answers.jsonl",
            shared_cache=shared_cache_path(model, tokenizer, replay.max_answer_tokens), write_caches=main_process,
            max_new_tokens=replay.max_answer_tokens, batch_size=recipe.eval.batch_size, known_only=replay.known_only)
        data = build_datasets(recipe.data, tokenizer, recipe.train.seed, replay_answerer=answerer)
        check_token_ids_fit(data, input_embedding_rows(model), recipe.model.name)  # the new replay answers' ids

    if main_process:
        log.info("%s", data_summary_line(data.stats, recipe.data.max_seq_len))
        warn_if_one_batch_holds_all(recipe, len(data.train))
    if replay is not None and replay.distill and data.stats["replay_examples"]:
        n = data.stats["replay_examples"]  # replay rows are the last ones (data/build.py)
        data.train[-n:] = add_teacher_targets(model, tokenizer.pad_token_id, data.train[-n:])

    recorded = run_dirs.load_before(run_dir) if resume else {}
    asked = heldout_fingerprint(data.heldout) if recipe.eval.before else None
    heldout_changed = resume and recipe.eval.before and (recorded.get("heldout_fingerprint", asked) != asked or _asked(
        data.heldout) != [(d.get("question"), d.get("key_fact")) for d in recorded.get("heldout_details") or []])
    accuracy_before, details_before = (None, [])
    if recipe.eval.before and (not resume or heldout_changed) and main_process:
        if heldout_changed and recorded.get("heldout_details"):
            log.warning("The held-out questions are not the ones %s started with: asking the untrained model them again "
                        "for the before / after comparison", run_dir)
        elif heldout_changed:  # eval.before turned on for the resume
            log.info("Asking the untrained model the held-out questions (the run started without asking them)")
        accuracy_before, details_before = _heldout(model, tokenizer, recipe, data.heldout)

    calibration = general_rows(data, recipe.data, tokenizer) if getattr(recipe.adapter, "init", None) in KNOWLEDGE_INITS else data.train
    model = build_adapter(model, recipe.adapter, quantized=quantization is not None, calibration=calibration)
    keep_trained_weights_in_float32(model, dtype, device, deepspeed=recipe.deepspeed is not None)
    for peft_config in getattr(model, "peft_config", {}).values():  # AutoPeftModel loads the base at this revision
        peft_config.revision = recipe.model.revision
    trainable, total = parameter_counts(model)
    log.info("Trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    has_eval = bool(data.eval)
    metrics_path = run_dir / "metrics.jsonl"
    resuming_at = checkpoints.latest_loadable(run_dir) if resume else None  # what prepare_resume will pick
    tensorboard = tensorboard_callback(run_dir / "tensorboard", resuming_at) if main_process else None
    if tensorboard is not None and cleanup is not None:  # a failed or interrupted run leaves no writer thread behind
        cleanup.callback(tensorboard.close)
    if not resume and main_process:
        metrics_path.unlink(missing_ok=True)
    callbacks = [
        RunTotals(lambda: run_totals(), interrupted=lambda: interrupt.interrupted),  # first: the end-of-training
        # record the next two write is the run's (none for a session a signal stopped)
        MetricsJsonlCallback(metrics_path),
        *([tensorboard] if tensorboard is not None else []),
        checkpoints.CompleteMarkerCallback(keep=recipe.train.save_total_limit, progress=lambda: run_progress()),
        checkpoints.SeededLengthGrouping(),  # group_by_length batches reproducible on resume
        ResumedSettings(),
        interrupt := signals.interrupt_callback(),  # Ctrl-C: checkpoint at the end of the step, then stop
        overfitting := OverfittingWatch(metrics=metrics_path),
        DivergenceGuard(recipe.train.lr),
        *(extra_callbacks or []),
    ]
    callbacks += [*early_stopping_callbacks(recipe.train.early_stopping_patience, has_eval), CheckpointBoundaries()]
    args = training_arguments(recipe, run_dir, device, dtype, has_eval)
    if main_process:  # before the first step, not at the first save an epoch in
        disk_space.check_before_training(run_dir, model, recipe, tokenizer, args, rows=len(data.train),
                                         world_size=dist_info().world_size, resume=resume)
    extras = trainer_extras(model, recipe.adapter, args)  # partial: unfreeze schedule, layer-wise LR groups
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        # several processes: padded with loss-free rows, so accelerate pads (and counts twice) no real rows
        eval_dataset=pad_eval_rows(data.eval, dist_info().world_size, args.per_device_eval_batch_size) or None,
        data_collator=PaddingCollator(tokenizer.pad_token_id),
        callbacks=[*extras.callbacks, *callbacks],
        method_optimizer=extras.optimizer,  # kept under DeepSpeed too (SFTTrainer.create_optimizer)
        supervised_logits_only=recipe.train.supervised_logits_only,
        share_prompt_prefix=recipe.train.share_prompt_prefix,
        bucket_within_batch=recipe.train.bucket_within_batch,
        packing=recipe.train.packing,
        hashed_dropout=recipe.train.hashed_dropout,
    )
    use_progress_bar(trainer)
    eval_loss_before = None
    if has_eval and not resume:
        with base_model_view(model):
            # Under a launcher, `Trainer.evaluate()` before training would keep the model from being wrapped: in DDP
            # (transformers then skips the DDP wrap: ranks trained apart, gradients never averaged) and in DeepSpeed.
            several = ds_config is not None or dist_info().world_size > 1
            if several:  # logged as evaluate() logs it: the curve starts at step 0 in metrics.jsonl and TensorBoard
                eval_started = time.perf_counter()
                eval_loss_before = trainer.eval_loss_unwrapped()
                trainer.log({"eval_loss": eval_loss_before, "eval_runtime": round(time.perf_counter() - eval_started, 4)})
            else:
                eval_loss_before = _eval_loss(trainer, has_eval)
    if resume:  # measured when the run started
        eval_loss_before = recorded.get("eval_loss")
        if heldout_changed and main_process:
            run_dirs.save_before(run_dir, {**recorded, "heldout_accuracy": accuracy_before,
                                           "heldout_details": details_before, "heldout_fingerprint": asked})
        else:
            accuracy_before, details_before = recorded.get("heldout_accuracy"), recorded.get("heldout_details") or []
    elif main_process:
        run_dirs.save_before(run_dir, {"eval_loss": eval_loss_before, "heldout_accuracy": accuracy_before,
                                       "heldout_details": details_before, "heldout_fingerprint": asked,
                                       "data_fingerprint": fingerprint,
                                       "split_fingerprint": data.split_fingerprint,
                                       "rows": [len(data.train), len(data.eval)], "base_fingerprint": base_fingerprint})

    resume_from = checkpoints.prepare_resume(
        run_dir, world_size=dist_info().world_size, deepspeed_stage=checkpoints.deepspeed_stage_of(args),
        main_process=main_process) if resume else None
    prior = (checkpoints.read_progress(resume_from) if resume_from else None) or checkpoints.Progress()
    overfitting.warned = prior.overfitting_warned  # said once in the whole run
    if resume_from and main_process:  # every rank adds its own tokens; rank 0 carries the earlier sessions' sum
        trainer.supervised_tokens_seen, trainer.input_tokens_seen = prior.supervised_tokens, prior.input_tokens

    def run_progress() -> checkpoints.Progress:
        """The whole run's totals so far (recorded with each checkpoint); sums over processes."""
        supervised, inputs = sum_over_processes(trainer.supervised_tokens_seen, trainer.input_tokens_seen)
        return checkpoints.Progress(
            supervised_tokens=supervised, input_tokens=inputs,
            train_seconds=prior.train_seconds + time.perf_counter() - train_started,
            loss_sum=prior.loss_sum + _session_loss_sum(trainer), steps=trainer.state.global_step,
            wall_seconds=prior.wall_seconds + time.perf_counter() - started,
            overfitting_warned=prior.overfitting_warned or overfitting.warned,
            eval_seconds=prior.eval_seconds + trainer.eval_seconds_in_training)

    def run_totals() -> tuple[float, float]:  # every rank calls it
        return totals_so_far(trainer, prior, train_started)

    train_started = time.perf_counter()
    output = train_or_finish(trainer, recipe, resume_from, prior.steps, has_eval, interrupt, run_dir, finishing,
                             deepspeed=ds_config is not None)
    train_loss, train_seconds = run_totals()
    eval_seconds = prior.eval_seconds + trainer.eval_seconds_in_training
    eval_loss_after = final_eval_loss(trainer, has_eval)
    if main_process and not prior.overfitting_warned:  # an earlier session of the run warned already
        overfitting.check_final(trainer.state.log_history, ships_best=bool(
            trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint))
    if tensorboard is not None:
        tensorboard.close()
    accuracy_after, details_after = _heldout(model, tokenizer, recipe, data.heldout)

    samples = _sample_answers(model, tokenizer, recipe, details_after)
    trainer.supervised_tokens_seen, trainer.input_tokens_seen = sum_over_processes(
        trainer.supervised_tokens_seen, trainer.input_tokens_seen)  # all ranks' tokens, for the summary
    with deepspeed_setup.gathered_for_save(trainer, recipe.adapter.method):  # ZeRO-3: every rank gathers what is saved
        if main_process:
            save_adapter(model, tokenizer, run_dir, recipe.adapter.method)
    if not main_process:
        return RunResult(run_dir, {})  # rank 0 writes metrics, plots, summary and model card

    trainable_at_end = parameter_counts(model)[0]  # gradual unfreezing ends with more than it started with
    write_loss_plot(run_dir, recipe, output.global_step)
    summary = {
        **summary_header(recipe, run_dir, quantization, device, dtype, threads, (trainable, total), data, output,
                         trainer.state.epoch),
        **({"trainable_params_end": trainable_at_end} if trainable_at_end != trainable else {}),
        "trained_tokens": trainer.supervised_tokens_seen,
        "input_tokens": trainer.input_tokens_seen,
        "train_seconds": round(train_seconds, 2),
        "eval_seconds_in_training": round(eval_seconds, 3),  # part of train_seconds, not of the speeds below
        "tokens_per_second": per_second(trainer.supervised_tokens_seen, train_seconds - eval_seconds),
        "input_tokens_per_second": per_second(trainer.input_tokens_seen, train_seconds - eval_seconds),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "train_loss": round(train_loss, 5),
        "eval_loss_before": eval_loss_before,
        "eval_loss_after": eval_loss_after,
        "overfitting_warning": overfitting.warned or prior.overfitting_warned,
        "stopped_early": trainer.state.max_steps > output.global_step,
        "weights_from_step": _weights_step(trainer, output.global_step),
        "heldout_questions": len(data.heldout),
        "heldout_accuracy_before": accuracy_before,
        "heldout_accuracy_after": accuracy_after,
        "heldout_finished_share_after": (
            sum(d["finished"] for d in details_after) / len(details_after) if details_after else None
        ),
        "samples": samples,
        "data_stats": data.stats,
        "wall_seconds": round(prior.wall_seconds + time.perf_counter() - started, 2),  # all sessions
        "base_fingerprint": base_fingerprint,
        "base_config": base_config_summary(model.config),  # named when an adapter does not fit a base
    }
    if details_after:
        atomic_write_text(
            run_dir / "heldout.jsonl",
            "".join(
                readable_json({**after, "reply_before": before.get("reply"), "correct_before": before.get("correct")}) + "\n"
                for after, before in zip(details_after, details_before or [{}] * len(details_after))
            ),
        )
    atomic_write_text(run_dir / "summary.json", readable_json(summary, indent=2))
    write_model_card(run_dir, recipe, summary)
    return RunResult(run_dir, summary)


def totals_so_far(trainer: Any, prior: checkpoints.Progress, train_started: float) -> tuple[float, float]:
    """The run's train loss and train seconds at the end of training: this session's added to the earlier ones'."""
    steps = trainer.state.global_step
    session_loss = _session_loss_sum(trainer, finished=True) if steps > prior.steps else 0.0
    return (prior.loss_sum + session_loss) / steps if steps else 0.0, prior.train_seconds + time.perf_counter() - train_started


def write_loss_plot(run_dir: Path, recipe: Recipe, steps: int) -> None:
    """RUN_DIR/plots/loss.png from metrics.jsonl, or a line saying why there is none."""
    title = f"{recipe.name or run_dir.name}: {method_label(recipe.adapter)}"
    if plot_loss_curves(read_metrics(run_dir / "metrics.jsonl"), run_dir / "plots" / "loss.png", title=title) is None:
        log.info("No loss was logged (train.logging_steps=%s, %d steps, no evaluation), so there is no plots/loss.png",
                 recipe.train.logging_steps, steps)


def summary_header(
    recipe: Recipe, run_dir: Path, quantization: Any, device: str, dtype: torch.dtype, threads: int,
    counts: tuple[int, int], data: Any, output: Any, epochs_trained: float | None = None,
) -> dict[str, Any]:
    """The summary.json keys every task shares: what ran, on what, and how much of the model trained. `epochs` is
    the recipe's setting; `epochs_trained` what the run went through (less when it stopped early or at max_steps)."""
    trainable, total = counts
    if quantization is not None and quantization.bits == 4 and quantization.compute_dtype == "auto":
        # `auto` is the dtype the weights load in (models/load.py bnb_config), which follows the device: recorded as
        # computed, since exports reproduce it wherever they run (peftkit.runs.trained_quantization)
        trains_weights = recipe.task != "causal_lm" or bool(getattr(recipe.adapter, "modules_to_save", None))
        computed = str(weights_dtype(dtype, trains_model_weights=trains_weights)).removeprefix("torch.")
        quantization = quantization.model_copy(update={"compute_dtype": computed})
    own_rows = len(data.train) - data.stats.get("replay_examples", 0)  # replay rows are counted in data_stats
    return {
        "recipe": recipe.name or run_dir.name,
        "base_model": recipe.model.name,
        "method": recipe.adapter.method,
        "quantization": quantization.model_dump() if quantization else None,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": threads,  # per process
        "processes": dist_info().world_size,
        "global_batch_size": global_batch_size(recipe),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total,
        # the recipe's examples as read, and the rows they made (a long text is split into several rows, some chat
        # templates make one per turn); classification data has one row per example
        "train_examples": data.stats.get("train_examples", own_rows),
        "train_rows": own_rows,
        "eval_examples": data.stats.get("eval_examples", len(data.eval)),
        "eval_rows": len(data.eval),
        "steps": output.global_step,
        "epochs": recipe.train.epochs if not recipe.train.max_steps else None,
        "epochs_trained": round(epochs_trained, 4) if epochs_trained is not None else None,
    }


def save_adapter(model: Any, tokenizer: Any, run_dir: Path, method: str | None = None) -> None:
    """The adapter in standard PEFT layout (safetensors), plus the tokenizer, written atomically.

    Methods without an adapter (full, partial) save the whole model into RUN_DIR/model instead."""
    from peftkit.adapters import save_trained

    saved = save_trained(model, run_dir, method)
    with atomic_directory(run_dir / "tokenizer", replace=True) as tmp:
        assert tmp is not None
        save_tokenizer(tokenizer, tmp)
    run_dirs.record_written(run_dir, saved.name, "tokenizer")  # `train --force` deletes no file of yours put there


def _sample_answers(model: Any, tokenizer: Any, recipe: Recipe, heldout_details: list[dict[str, Any]]
                    ) -> list[dict[str, Any]]:
    """The recipe's eval.sample_prompts answered; without them two held-out questions as the evaluation answered them,
    with their key facts and whether the reply holds one (`heldout_samples`)."""
    from peftkit.data.chat import with_system_prompt
    from peftkit.train.report import heldout_samples

    prompts = list(recipe.eval.sample_prompts)
    if not prompts:
        return [{"prompt": d["question"], "reply": d["reply"], "key_fact": d["key_fact"], "correct": d["correct"]}
                for d in heldout_samples(heldout_details)]
    conversations = [with_system_prompt([{"role": "user", "content": p}], recipe.data.system_prompt) for p in prompts]
    replies = generate_replies(model, tokenizer, conversations, max_new_tokens=recipe.eval.max_new_tokens)
    return [{"prompt": p, "reply": r.text} for p, r in zip(prompts, replies)]


__all__ = ["RunResult", "PeftkitError", "train"]
