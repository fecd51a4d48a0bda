"""Checkpoint completeness: a checkpoint counts only once its `.complete` marker exists.

The Trainer writes `checkpoint-N/` file by file (and under DeepSpeed every rank writes its own
partition); a process killed mid-save leaves a partial folder. Once every rank has finished saving,
rank 0 fsyncs the folder and writes the marker in `on_save`; resume only ever uses marked checkpoints,
removes unmarked ones, and checks the checkpoint fits the run (DeepSpeed on/off, number of processes).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from peftkit.errors import RunDirError
from peftkit.utils.atomic import fsync_tree

log = logging.getLogger(__name__)

MARKER = ".complete"
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
"""What a checkpoint's trained weights are saved as (an adapter, or a whole model: one file or shards)."""
TRAINING_STATE_FILES = ("optimizer.pt", "scheduler.pt")
"""What transformers resumes the optimizer and the schedule from (with `rng_state*.pth`, the random draws)."""
_STEP = re.compile(r"^checkpoint-(\d+)$")


def _checkpoints_under(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP.match(p.name).group(1)))  # type: ignore[union-attr]


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    return _checkpoints_under(run_dir / "checkpoints")


def step_of(checkpoint: Path) -> int:
    match = _STEP.match(checkpoint.name)
    if match is None:
        raise ValueError(f"{checkpoint} is not a checkpoint-N folder")
    return int(match.group(1))


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / MARKER).is_file() and (checkpoint / "trainer_state.json").is_file()


def latest_complete(run_dir: Path) -> Path | None:
    complete = [p for p in checkpoint_dirs(run_dir) if is_complete(p)]
    return complete[-1] if complete else None


def remove_incomplete(run_dir: Path) -> list[Path]:
    removed = [p for p in checkpoint_dirs(run_dir) if not is_complete(p)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def read_marker(checkpoint: Path) -> dict[str, Any]:
    """What the marker records: step, world_size, deepspeed_stage (older markers hold just the step)."""
    text = (checkpoint / MARKER).read_text(encoding="utf-8").strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {"step": data}


@dataclass
class Progress:
    """Totals over every step trained so far, kept in each checkpoint's marker so that the summary of a
    resumed run covers the whole run (the Trainer only counts the steps of its own session)."""

    supervised_tokens: int = 0
    input_tokens: int = 0
    train_seconds: float = 0.0
    loss_sum: float = 0.0
    """Sum of the per-step training losses (their mean is the run's train_loss)."""
    steps: int = 0
    wall_seconds: float = 0.0
    """Wall time of the sessions so far (loading, evaluation and training), up to this checkpoint."""
    overfitting_warned: bool = False
    """An earlier session warned about overfitting (the warning belongs to the run, not to the session)."""
    eval_seconds: float = 0.0
    """Of train_seconds, the time the evaluations during training took (left out of the training speed)."""


def read_progress(checkpoint: Path) -> Progress | None:
    """The totals recorded with `checkpoint`; None for checkpoints written before they were recorded."""
    recorded = read_marker(checkpoint).get("progress")
    if not isinstance(recorded, dict):
        return None
    names = {f.name for f in fields(Progress)}
    return Progress(**{k: v for k, v in recorded.items() if k in names})


def deepspeed_stage_of(args: Any) -> int | None:
    """The ZeRO stage of a Trainer's arguments; None when DeepSpeed is off."""
    hf_config = getattr(args, "hf_deepspeed_config", None)
    if hf_config is None:
        return None
    return int(hf_config.config.get("zero_optimization", {}).get("stage", 0))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class CompleteMarkerCallback(TrainerCallback):
    """Marks each saved checkpoint complete, then keeps the newest `keep` complete ones.

    Pruning here (not by the Trainer's save_total_limit, which deletes before the new checkpoint is
    marked) means a complete checkpoint exists at every moment, also with keep=1. `progress` (called on
    every rank: it may sum over processes) gives the run's totals to record in the marker."""

    def __init__(self, keep: int | None = None, progress: Callable[[], Progress] | None = None) -> None:
        self.keep = keep
        self.progress = progress

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _barrier()  # every rank has written its part (DeepSpeed partitions, rng_state_<rank>.pth)
        progress = self.progress() if self.progress is not None else None
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            return
        fsync_tree(folder)  # and the modes other files get (safetensors writes its files owner-only)
        marker = {"step": state.global_step, "world_size": args.world_size, "deepspeed_stage": deepspeed_stage_of(args),
                  **({"progress": asdict(progress)} if progress is not None else {})}
        tmp = folder / f"{MARKER}.tmp"
        tmp.write_text(json.dumps(marker), encoding="utf-8")
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, folder / MARKER)
        if self.keep:
            self._prune(Path(args.output_dir), folder, state.best_model_checkpoint)

    def _prune(self, root: Path, current: Path, best: str | None) -> None:
        complete = [p for p in _checkpoints_under(root) if is_complete(p)]
        protected = {current.resolve(), *([Path(best).resolve()] if best else [])}
        excess = [p for p in complete if p.resolve() not in protected][: max(0, len(complete) - self.keep)]
        for path in excess:
            # unmarked first: a kill during the deletion leaves an incomplete folder (removed on resume), never a
            # marked one missing its weights
            (path / MARKER).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)


def evaluated_before_save(checkpoint: Path) -> bool:
    """False where an evaluation at `checkpoint`'s step that an interrupted session logged is run again on resume.
    The run's last step is saved before its final evaluation (callbacks.CheckpointBoundaries), which a run resumed
    there runs again (run.final_eval_loss: the checkpoint's log_history lacks it), so the logged one is dropped with
    what came after it. Elsewhere it is kept: a Ctrl-C's checkpoint on an epoch's last step is also saved before
    that epoch's evaluation, but the resumed run starts the next epoch and never runs it again."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        step = int(state["global_step"])
        if step < int(state["max_steps"]):
            return True
        return any("eval_loss" in entry and entry.get("step") == step for entry in state.get("log_history", []))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return True  # unknown: keep what was logged (a repeated point rather than a missing one)


def truncate_metrics(path: Path, step: int, *, evaluated_at_step: bool = True) -> int:
    """Drop metric records logged after `step` (they are logged again when training resumes there), and an
    interrupted session's end-of-training record (`train_runtime`, `train_loss`: it described a session, not the
    run) with what followed it (the final evaluation, which the resumed session runs again). `evaluated_at_step`
    False: an evaluation at `step` itself came after the checkpoint (evaluated_before_save) and is dropped too."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
            record_step = record.get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            continue
        if "train_runtime" in record:
            break
        if record_step < step or (record_step == step and (evaluated_at_step or "eval_loss" not in record)):
            kept.append(line)
    if len(kept) != len(lines):
        from peftkit.utils.atomic import atomic_write_text

        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def check_compatible(checkpoint: Path, *, world_size: int, deepspeed_stage: int | None) -> None:
    """A ZeRO checkpoint only loads into the same setup it was saved from; say so before loading anything."""
    marker = read_marker(checkpoint)
    has_deepspeed_state = any(checkpoint.glob("global_step*"))
    if deepspeed_stage is not None and not has_deepspeed_state:
        raise RunDirError(
            f"--resume: {checkpoint} was saved without DeepSpeed, but this run uses DeepSpeed (stage {deepspeed_stage}); "
            "resume with the recipe's original setting (remove `deepspeed:`), or start a new run"
        )
    if deepspeed_stage is None and has_deepspeed_state:
        raise RunDirError(
            f"--resume: {checkpoint} holds DeepSpeed state (stage {marker.get('deepspeed_stage', '?')}); "
            "resume with the same `deepspeed:` setting it was trained with"
        )
    saved_world = marker.get("world_size")
    if saved_world is None or saved_world == world_size:
        return
    if deepspeed_stage:
        raise RunDirError(
            f"--resume: {checkpoint} holds ZeRO stage {deepspeed_stage} state partitioned over {saved_world} processes, "
            f"but this run has {world_size}; resume with the same number of processes (--nproc {saved_world})"
        )
    # The Trainer skips the epoch's first `step x batches` batches on every process: with another process count
    # that skips rows never trained, or trains rows twice, and the global batch size changes under the schedule.
    raise RunDirError(
        f"--resume: {checkpoint} was saved by {saved_world} process(es), but this run has {world_size}; the rest "
        f"of the epoch would skip rows never trained or repeat trained ones, so resume with the same number "
        f"(--nproc {saved_world}{' across all nodes' if saved_world > 1 else ''}), or start again with --force"
    )


def check_resume_setup(run_dir: Path, *, world_size: int, deepspeed_stage: int | None) -> None:
    """`check_compatible` for the checkpoint a resume will start from, before any worker starts or weights load
    (prepare_resume checks again, after it has set damaged checkpoints aside)."""
    checkpoint = latest_loadable(run_dir)
    if checkpoint is not None:
        check_compatible(checkpoint, world_size=world_size, deepspeed_stage=deepspeed_stage)


def damage(checkpoint: Path) -> str | None:
    """What makes a checkpoint marked complete unloadable (a file cut short or overwritten after the save), found
    cheaply: torch files (optimizer, scheduler, RNG states) are zip archives whose directory sits at the end."""
    import zipfile

    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "trainer_state.json is not valid JSON"
    if read_marker(checkpoint).get("deepspeed_stage") is None:  # DeepSpeed keeps its states in global_step*/
        if not any((checkpoint / name).is_file() for name in WEIGHT_FILES):
            return f"its weights ({' or '.join(WEIGHT_FILES)}) are missing"
        # without them transformers resumes quietly on a fresh optimizer, a restarted schedule, other random draws
        missing = [name for name in TRAINING_STATE_FILES if not (checkpoint / name).is_file()]
        if not any(checkpoint.glob("rng_state*.pth")):
            missing.append("rng_state.pth")
        if missing:
            return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
    index = checkpoint / "model.safetensors.index.json"
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()) if index.is_file() else set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "model.safetensors.index.json is not a whole shard index"
    missing = sorted(name for name in shards if not (checkpoint / name).is_file())
    if missing:
        return f"{missing[0]} (a shard its index names) is missing"
    for path in sorted(checkpoint.rglob("*")):
        if path.suffix in (".pt", ".pth", ".bin") and path.is_file():
            try:
                zipfile.ZipFile(path).close()
            except (OSError, zipfile.BadZipFile):
                return f"{path.relative_to(checkpoint)} is not a whole torch file"
        elif path.suffix == ".safetensors" and path.is_file() and not _whole_safetensors(path):
            return f"{path.relative_to(checkpoint)} is not a whole safetensors file"
    return None


def _whole_safetensors(path: Path) -> bool:
    """A safetensors file is an 8-byte header length, a JSON header and the tensor bytes the header's offsets
    span: it is whole when its size is exactly that (read from the header, not by loading the tensors)."""
    try:
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if not 2 <= header_len <= path.stat().st_size - 8:
                return False
            header = json.loads(f.read(header_len))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        return path.stat().st_size == 8 + header_len + max(ends, default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return False


def trained_to_the_end(resume_from: Path | None, recipe: Any, prior_steps: int, has_eval: bool,
                       deepspeed: bool = False) -> bool:
    """A resumed run whose steps were all trained before it stopped (its max_steps reached, or early stopping had
    ended it): it is finished from its checkpoint (`restore_finished`), not trained on. DeepSpeed checkpoints are
    restored by the engine itself, so such runs train on."""
    cfg = recipe.train
    if resume_from is None or deepspeed:
        return False
    planned = cfg.max_steps or _planned_steps(resume_from)  # `epochs: 1.5` plans a step count the epochs do not end on
    return (bool(planned) and prior_steps >= planned) or stopped_early(
        resume_from, cfg.early_stopping_patience if has_eval else None)


def _planned_steps(checkpoint: Path) -> int | None:
    """The run's step count as the Trainer planned it (trainer_state.json's max_steps): resumed after its last step,
    a run of fractional epochs would otherwise train one step more, into an epoch the plan cut short."""
    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_loadable(run_dir: Path) -> Path | None:
    """The newest complete checkpoint that is not damaged: the one `prepare_resume` picks."""
    return next((p for p in reversed(checkpoint_dirs(run_dir)) if is_complete(p) and damage(p) is None), None)


def all_damaged(run_dir: Path) -> str | None:
    """Where the run saved complete checkpoints but none can be resumed from: what is wrong with the newest (each
    checkpoint's files read once)."""
    newest = None
    for checkpoint in reversed([p for p in checkpoint_dirs(run_dir) if is_complete(p)]):
        problem = damage(checkpoint)
        if problem is None:
            return None
        newest = newest or f"{checkpoint.name}: {problem}"
    return f"every checkpoint it saved is damaged ({newest})" if newest else None


def refuse_if_all_damaged(run_dir: Path) -> None:
    """`--resume` (also `--resume auto`, which must not start over and delete them) on such a run."""
    damaged = all_damaged(run_dir)
    if damaged:
        raise RunDirError(f"--resume: {run_dir} cannot be resumed: {damaged}; start it again with --force")


def rebase_best(checkpoint: Path) -> None:
    """Point the recorded best checkpoint (an absolute path) into the run's current checkpoints folder: a run
    directory that was moved would otherwise lose it (transformers drops a best path that no longer exists, and the
    run would ship its last weights under the best step's name). Rewrites `checkpoint`'s trainer_state.json."""
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text(encoding="utf-8"))
    best = state.get("best_model_checkpoint")
    if not best:
        return
    here = checkpoint.parent / Path(best).name
    if not is_complete(here):
        log.warning("The best checkpoint %s is gone (not in %s): the run goes on without it and ships its last weights",
                    Path(best).name, checkpoint.parent)
        here_value = None
    else:
        here_value = str(here)
    if here_value != best:
        from peftkit.utils.atomic import atomic_write_text

        atomic_write_text(state_file, json.dumps({**state, "best_model_checkpoint": here_value}, indent=2) + "\n")


def prepare_resume(
    run_dir: Path, *, world_size: int = 1, deepspeed_stage: int | None = None, main_process: bool = True
) -> Path:
    """The checkpoint to resume from, after removing incomplete ones and metrics logged past it (rank 0). A damaged
    checkpoint (marked complete, but a file is cut short) is passed over, with a warning, for the one before it."""
    if main_process:
        for path in remove_incomplete(run_dir):
            log.warning("Removed incomplete checkpoint %s (its save was interrupted)", path)
    complete = [p for p in checkpoint_dirs(run_dir) if is_complete(p)]
    if not complete:
        raise RunDirError(f"--resume: {run_dir} has no complete checkpoint; start it again with --force")
    checkpoint = None
    for candidate in reversed(complete):
        problem = damage(candidate)
        if problem is None:
            checkpoint = candidate
            break
        if main_process:  # set aside: left in place, the Trainer's rotation would count it and delete a good one
            aside = candidate.with_name(f".damaged-{candidate.name}")
            shutil.rmtree(aside, ignore_errors=True)
            candidate.rename(aside)
            log.warning("Checkpoint %s is damaged (%s): moved it to %s, resuming from an earlier one", candidate,
                        problem, aside.name)
    if checkpoint is None:
        raise RunDirError(f"--resume: every checkpoint in {run_dir / 'checkpoints'} is damaged (a file is cut short or "
                          "missing), so nothing can be resumed; start the run again with --force")
    check_compatible(checkpoint, world_size=world_size, deepspeed_stage=deepspeed_stage)
    if main_process:  # a refused resume keeps the record of how to resume
        (run_dir / "interrupted.json").unlink(missing_ok=True)
        rebase_best(checkpoint)
    _barrier()  # the other ranks read the rebased trainer_state.json
    if main_process:
        dropped = truncate_metrics(run_dir / "metrics.jsonl", step_of(checkpoint),
                                   evaluated_at_step=evaluated_before_save(checkpoint))
        if dropped:
            log.info("Dropped %d metric records logged after the checkpoint of step %d (logged again as training "
                     "goes on)", dropped, step_of(checkpoint))
    log.info("Resuming from %s", checkpoint)
    return checkpoint


def _length_grouped_samplers(loader: Any, depth: int = 4) -> list[Any]:
    from transformers.trainer_pt_utils import LengthGroupedSampler

    if loader is None or depth == 0:
        return []
    if isinstance(loader, LengthGroupedSampler):
        return [loader]
    found = []
    for attr in ("sampler", "batch_sampler"):
        child = getattr(loader, attr, None)
        if child is not None and child is not loader:
            found.extend(_length_grouped_samplers(child, depth - 1))
    return found


class SeededLengthGrouping(TrainerCallback):
    """Makes `group_by_length` batches a function of (data_seed, epoch), so a resumed run sees the same batches.

    The Trainer's train LengthGroupedSampler draws its permutation from the global RNG when the epoch's
    iterator is created; a resumed run reaches that point with a different RNG state than the original
    run did, so without this it trains the rest of the epoch on different batches."""

    def on_epoch_begin(self, args: Any, state: Any, control: Any, train_dataloader: Any = None, **kwargs: Any) -> None:
        import math

        import torch

        epoch = math.floor((state.epoch or 0.0) + 1e-6)
        seed = args.data_seed if args.data_seed is not None else args.seed
        for sampler in _length_grouped_samplers(train_dataloader):
            sampler.generator = torch.Generator().manual_seed(seed * 1000 + epoch)


def stopped_early(checkpoint: Path, patience: int | None) -> bool:
    """The run had already stopped early when `checkpoint` was saved (EarlyStoppingCallback's counter reached
    `patience`): resuming must finish it, not train on until the next evaluation."""
    if not patience:
        return False
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    saved = (state.get("stateful_callbacks") or {}).get("EarlyStoppingCallback")
    for entry in saved if isinstance(saved, list) else [saved]:
        if isinstance(entry, dict) and entry.get("attributes", {}).get("early_stopping_patience_counter", 0) >= patience:
            return True
    return False


def restore_finished(trainer: Any, checkpoint: Path) -> Any:
    """A run stopped after its last step was saved (killed during the final evaluation or while saving): load that
    checkpoint instead of training, since transformers resumes a `max_steps` run at its last step by training one
    step more (and an early-stopped run until its next evaluation). Returns the Trainer's TrainOutput for no new steps."""
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    best = trainer.state.best_model_checkpoint  # early stopping ships the best evaluation's weights, as the Trainer would
    if trainer.args.load_best_model_at_end and best and Path(best) != checkpoint:
        if Path(best).is_dir():  # `prepare_resume` put it in this run's checkpoints folder
            trainer._load_from_checkpoint(str(best))
        else:
            log.warning("The best checkpoint %s is gone: shipping the weights of step %d", best, trainer.state.global_step)
            trainer.state.best_model_checkpoint = None
    _log_run_end(trainer)
    return TrainOutput(trainer.state.global_step, 0.0, {})


def _log_run_end(trainer: Any) -> None:
    """The end-of-training record for metrics.jsonl, which the Trainer writes only when it trains: resuming dropped
    the killed session's there (`truncate_metrics`). RunTotals fills in the run's totals (without it, nothing is
    written). TensorBoard is left out: it holds the killed session's record unless the kill came before the Trainer
    logged it, and a second one there would be a duplicate."""
    from peftkit.train.callbacks import MetricsJsonlCallback, RunTotals

    if not any(isinstance(callback, RunTotals) for callback in trainer.callback_handler.callbacks):
        return
    logs: dict[str, Any] = {"train_runtime": 0.0, "train_loss": 0.0}
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, (RunTotals, MetricsJsonlCallback)):
            callback.on_log(trainer.args, trainer.state, trainer.control, logs=logs)
