"""Ctrl-C (SIGINT) or SIGTERM during training: save a checkpoint at the end of the step, then stop.

The handler only sets a flag; `on_step_end` turns it into `should_save` + `should_training_stop`,
so the Trainer writes an ordinary (complete-marked) checkpoint and returns. With several processes
the flag is OR-ed across ranks every step, so all ranks stop at the same step (a rank that went on
alone would wait forever in the next collective). A second Ctrl-C a moment later quits at once.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from peftkit.errors import PeftkitError

log = logging.getLogger(__name__)

INTERRUPTED_FILE = "interrupted.json"
DUPLICATE_WINDOW_S = 2.0
"""Signals this soon after the first are the same interrupt delivered twice (terminal and launcher)."""


class TrainingInterrupted(PeftkitError):
    """Training stopped on a signal after saving a checkpoint; the run can be resumed."""

    def __init__(self, step: int, checkpoint: Path, run_dir: Path, resume_command: str | None = None,
                 signal_name: str | None = None, coordinated: bool = True) -> None:
        self.coordinated = coordinated
        """Every rank stopped at the same step (the stop flag is all-reduced during training); a signal after
        training reaches each rank wherever it is, so there is no common point to wait at."""
        self.step = step
        self.checkpoint = checkpoint
        self.run_dir = run_dir
        self.signal_name = signal_name
        # the shell's convention: 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM)
        self.exit_code = 128 + int(getattr(signal.Signals, signal_name or "SIGINT", signal.SIGINT))
        from peftkit.utils.command_name import command as typed

        command = resume_command or typed("train", str(run_dir), "--resume")
        super().__init__(
            f"training interrupted at step {step}; checkpoint saved in {checkpoint}.\n"
            f"Resume it with:  {command}"
        )

    def with_command(self, resume_command: str) -> "TrainingInterrupted":
        return TrainingInterrupted(self.step, self.checkpoint, self.run_dir, resume_command, self.signal_name)


def _distributed_any(flag: bool, device: Any) -> bool:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class InterruptCallback(TrainerCallback):
    """Installs the SIGINT/SIGTERM handlers for the duration of `trainer.train()`.

    Outside training (model loading, final evaluation) Ctrl-C keeps its usual meaning."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.signals = signals
        self.requested_at: float | None = None
        self.signal_name: str | None = None
        self.stopped_step: int | None = None
        self.finished_anyway = False
        self._previous: dict[int, Any] = {}
        self._announce = True

    @property
    def interrupted(self) -> bool:
        return self.stopped_step is not None and not self.finished_anyway

    def handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.requested_at is None:
            self.requested_at = now
            self.signal_name = signal.Signals(signum).name
            if self._announce:
                print(
                    f"\n{self.signal_name}: saving a checkpoint at the end of this step, then stopping "
                    "(press Ctrl-C again to quit without saving)",
                    file=sys.stderr,
                    flush=True,
                )
            return
        if now - self.requested_at < DUPLICATE_WINDOW_S:
            return
        raise KeyboardInterrupt

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._announce = state.is_world_process_zero
        for signum in self.signals:
            try:
                self._previous[signum] = signal.signal(signum, self.handle)
            except ValueError:  # not the main thread: leave signals alone
                log.debug("not in the main thread: Ctrl-C will not checkpoint")
                self._previous.clear()
                return

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if _distributed_any(self.requested_at is not None, args.device):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_step = state.global_step
            self.finished_anyway = state.max_steps > 0 and state.global_step >= state.max_steps

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The stop breaks the epoch loop, and the Trainer then ends the epoch: with epoch-wise evaluation and saving
        that would add an evaluation (an early-stopping count the uninterrupted run never makes) and save the same
        checkpoint again. At a real epoch boundary both were due anyway, and stay."""
        if self.stopped_step is not None and not self.finished_anyway and state.epoch is not None \
                and abs(state.epoch - round(state.epoch)) > 1e-6:
            control.should_evaluate = False
            control.should_save = False

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.restore()

    @property
    def arrived_after_last_step(self) -> bool:
        """A signal came after the last step ended (during its evaluation or checkpoint save): training ran to the
        end, but the user asked to stop."""
        return self.requested_at is not None and self.stopped_step is None

    def restore(self) -> None:
        """Put the caller's handlers back; also called when `trainer.train()` raises (on_train_end is not reached),
        or the next Ctrl-C in a notebook would be swallowed."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


def interrupt_callback() -> InterruptCallback:
    """The callback that makes Ctrl-C save a checkpoint; handlers go in when training starts."""
    return InterruptCallback()


def raise_if_interrupted(callback: InterruptCallback, trainer: Any, run_dir: Path) -> None:
    """After `trainer.train()`: if a signal stopped it, record where (rank 0) and raise TrainingInterrupted. One that
    came during the last step's evaluation or save stops as a signal after training does (`FinishingGuard`): the run
    is resumable from its last checkpoint, and `--resume` finishes it."""
    if callback.finished_anyway:
        log.info("%s arrived at the last step: training had finished; completing the run", callback.signal_name)
    if callback.arrived_after_last_step:
        raise _StoppedFinishing(callback.signal_name or "SIGINT")
    if not callback.interrupted:
        return
    step = int(callback.stopped_step or 0)
    checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{step}"
    if trainer.is_world_process_zero():
        _write_record(run_dir, step, checkpoint, callback.signal_name)
    raise TrainingInterrupted(step, checkpoint, run_dir, signal_name=callback.signal_name)


def say_where_it_resumes(run_dir: Path) -> None:
    """After a second Ctrl-C (quit without saving): what the run's checkpoints still give."""
    from peftkit.train.checkpoints import latest_loadable, step_of
    from peftkit.utils.command_name import command

    checkpoint = latest_loadable(run_dir)
    if checkpoint is None:
        log.warning("Quit without saving: %s saved no checkpoint, so `%s` starts it over", run_dir,
                    command("train", str(run_dir), "--force"))
    else:
        log.warning("Quit without saving: the run resumes from its last checkpoint, step %d (%s), with `%s`",
                    step_of(checkpoint), checkpoint.name, command("train", str(run_dir), "--resume"))


def _write_record(run_dir: Path, step: int, checkpoint: Path, signal_name: str | None,
                  resume: str | None = None) -> None:
    from peftkit.utils.atomic import atomic_write_text

    atomic_write_text(
        run_dir / INTERRUPTED_FILE,
        json.dumps({"step": step, "checkpoint": str(checkpoint), "signal": signal_name,
                    "resume": resume or f"peftkit train {shlex.quote(str(run_dir))} --resume"}) + "\n",
    )


class _StoppedFinishing(BaseException):
    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


class FinishingGuard:
    """Ctrl-C / SIGTERM after training (final evaluation, samples, saving: minutes on a CPU) stops at once, but the
    run is resumable from its last checkpoint (`--resume` finishes it): say so, and leave interrupted.json, as an
    interrupt during training does. `arm()` when training has returned; leaving the `with` restores the handlers."""

    def __init__(self, run_dir: Path, main_process: bool = True) -> None:
        self.run_dir = run_dir
        self.main_process = main_process
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        raise _StoppedFinishing(signal.Signals(signum).name)

    def arm(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                return

    def __enter__(self) -> "FinishingGuard":
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        if not isinstance(exc, _StoppedFinishing):
            return
        from peftkit.train.checkpoints import latest_loadable, step_of

        finished = (self.run_dir / "summary.json").is_file()  # only the model card was left to write
        checkpoint = None if finished else latest_loadable(self.run_dir)
        if checkpoint is None:  # nothing to resume: the usual meaning of the signal
            if exc.signal_name == "SIGTERM":
                from peftkit.errors import Terminated

                raise Terminated() from None
            raise KeyboardInterrupt from None
        step = step_of(checkpoint)
        if self.main_process:
            _write_record(self.run_dir, step, checkpoint, exc.signal_name)
        raise TrainingInterrupted(step, checkpoint, self.run_dir, signal_name=exc.signal_name,
                                  coordinated=False) from None


def read_interrupted(run_dir: Path, since: float = 0.0, argv: list[str] | None = None) -> dict[str, Any] | None:
    """The record a worker left when a signal stopped training (written after `since`, a time.time()).

    The launching process reads it, and it alone knows the command the user ran (a worker's is torchrun's, without
    `--nproc`): its resume command goes into the record."""
    path = run_dir / INTERRUPTED_FILE
    try:
        if path.stat().st_mtime < since:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    from peftkit.train.launch import WORKER_ENV, resume_command

    if not os.environ.get(WORKER_ENV) and "step" in data and "checkpoint" in data:
        data["resume"] = resume_command(argv)
        _write_record(run_dir, int(data["step"]), Path(data["checkpoint"]), data.get("signal"), data["resume"])
    return data
