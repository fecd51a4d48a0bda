"""Trainer callbacks: JSONL metrics, supervised-token accounting, loss plots."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

log = logging.getLogger(__name__)


class MetricsJsonlCallback(TrainerCallback):
    """Appends every log event (loss, lr, eval loss, ...) as one JSON line to `metrics.jsonl`.

    `time` counts the whole run: a resumed session goes on from the last record the earlier sessions kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = time.perf_counter()
        self.offset: float | None = None  # read at the first record: resuming truncates the file after __init__

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        if self.offset is None:
            self.offset = max((float(r.get("time", 0.0)) for r in read_metrics(self.path)), default=0.0)
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                  "time": round(self.offset + time.perf_counter() - self.start, 2)}
        record.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str))})
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


class RunTotals(TrainerCallback):
    """Makes the Trainer's end-of-training record (metrics.jsonl, TensorBoard) describe the whole run, as the
    summary does: its own `train_loss` and `train_runtime` cover one session of a resumed run, and its loss adds
    the last steps of rank 0 alone. Must come before the callbacks that write logs; `totals` is called on every
    rank (it may reduce over processes) and returns (train loss, train seconds) of the run so far."""

    def __init__(self, totals: Any, interrupted: Any = lambda: False) -> None:
        self.totals = totals
        self.interrupted = interrupted

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs and "train_loss" in logs and "train_runtime" in logs:
            loss, seconds = self.totals()  # on every rank, also for a record that is dropped: it may reduce
            if self.interrupted():  # a session stopped by a signal: the run's own record comes when it is resumed
                logs.clear()
                return
            logs.update(train_loss=loss, train_runtime=round(seconds, 4))
            if seconds > 0:  # the Trainer's rates are one session's, over its own clock: these are the run's
                samples = state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps \
                    * args.world_size
                logs.update(train_steps_per_second=round(state.global_step / seconds, 3),
                            train_samples_per_second=round(samples / seconds, 3))


def per_second(count: int, seconds: float) -> float | None:
    """A rate for the summary (None when nothing was timed)."""
    return round(count / seconds, 2) if seconds > 0 else None


class ResumedSettings(TrainerCallback):
    """A resumed run takes `train.logging_steps` from its recipe (it may change on resume): the Trainer would keep
    the value stored in the checkpoint's trainer_state.json."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.logging_steps and args.logging_steps >= 1:
            state.logging_steps = args.logging_steps


class CheckpointBoundaries(TrainerCallback):
    """Puts each checkpoint where a resumed run goes on as the uninterrupted run did. Goes last: the callbacks before
    it decide the saves.

    - Every checkpoint is a logging point: resumed, transformers restarts its running loss average at the checkpoint's
      step, so the first loss a resumed run logged averaged fewer steps (with `logging_steps` 5 and a checkpoint at
      step 12, steps 13-15 instead of 11-15).
    - A `save_steps` checkpoint on an epoch's last step waits for the evaluation that closes the epoch: saved before
      it, a run killed during that evaluation resumed past it and never ran it (its eval loss missing from
      metrics.jsonl, the plot and the overfitting watch). Not where training stops at that step (a signal, the
      last step): that checkpoint is written at once."""

    def __init__(self) -> None:
        self.deferred = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        epoch_ends = state.epoch is not None and float(state.epoch).is_integer()  # epoch + 1.0 exactly at its end
        # not when training stops here: a Ctrl-C's checkpoint must not wait for an evaluation (a second Ctrl-C, or a
        # scheduler's kill after its grace period, would lose it), and the last step's evaluation is made up for
        if control.should_save and epoch_ends and args.eval_strategy == "epoch" and not control.should_training_stop:
            control.should_save, self.deferred = False, True
        if control.should_save:
            control.should_log = True

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.deferred:
            control.should_save, self.deferred = True, False
        if control.should_save:
            control.should_log = True


class ProgressBar(ProgressCallback):
    """The Trainer's progress bar, with its log lines on stderr beside the bar (tqdm writes them to stdout, which holds
    what a command reports: `peftkit train ... > summary.txt`), and silent for a record emptied by an earlier callback
    (RunTotals drops an interrupted session's end record; the bar would print `{}`). In a file or pipe an evaluation
    during training has no bar of its own: one under the training bar is drawn with cursor-up escapes, which a log
    file keeps as they are."""

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.training_bar is None or sys.stderr.isatty():
            super().on_prediction_step(args, state, control, **kwargs)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs:
            with contextlib.redirect_stdout(sys.stderr):  # tqdm.write looks sys.stdout up when it writes
                super().on_log(args, state, control, logs=logs, **kwargs)


def use_progress_bar(trainer: Any) -> None:
    """Put `ProgressBar` in the place of the Trainer's own."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ProgressBar())


class OverfittingWatch(TrainerCallback):
    """Warns once when eval loss rises for two evaluations in a row while train loss keeps falling."""

    def __init__(self, window: int = 2, metrics: Path | None = None) -> None:
        self.window = window
        self.metrics = metrics
        """The run's metrics.jsonl: a resumed run replays it (the checkpoint's own log_history lacks an evaluation
        that followed the save, as an epoch's closing one does after a `save_steps` checkpoint on its last step)."""
        self.evals: list[float] = []
        self.trains_at_eval: list[float] = []
        self.last_train: float | None = None
        self.warned = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """A resumed run goes on from the evaluations of the sessions before, as the uninterrupted run would."""
        if self.evals:
            return
        for record in read_metrics(self.metrics) if self.metrics else state.log_history:
            self.on_log(args, state, control, record)
            self.on_evaluate(args, state, control, record)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.last_train = float(logs["loss"])

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not metrics or "eval_loss" not in metrics or self.last_train is None:
            return
        self.evals.append(float(metrics["eval_loss"]))
        self.trains_at_eval.append(self.last_train)
        if self.warned or len(self.evals) <= self.window:
            return
        recent_eval = self.evals[-self.window - 1 :]
        recent_train = self.trains_at_eval[-self.window - 1 :]
        rising = all(b > a for a, b in zip(recent_eval, recent_eval[1:]))
        # Not rising, and lower at the end: with eval_steps below logging_steps two evaluations see one logged loss.
        falling = all(b <= a for a, b in zip(recent_train, recent_train[1:])) and recent_train[-1] < recent_train[0]
        if rising and falling:
            self.warned = True
            log.warning(
                "Overfitting: eval loss rose for %d evaluations (%s) while train loss kept falling; consider fewer "
                "epochs, a lower lr, or train.early_stopping_patience", self.window,
                " -> ".join(f"{v:.3f}" for v in recent_eval),
            )

    def check_final(self, log_history: list[dict[str, Any]], ships_best: bool) -> None:
        """Warns (unless it did already) when the shipped last step's eval loss ends on one large rise while train
        loss fell: a run with few evaluations often does, which the two-in-a-row rule above cannot see. "Large": the
        highest of all evaluations during training, 10 % over the best, and more than a quarter of what training had
        gained by then (the defaults' small late rise, a price paid for facts learnt, and a flat noisy curve stay
        unmentioned). A loss that is not finite is divergence, stopped by DivergenceGuard, not overfitting."""
        evals = [(int(e.get("step", 0)), float(e["eval_loss"])) for e in log_history if "eval_loss" in e]
        if self.warned or ships_best or len(evals) < 3 or not all(math.isfinite(loss) for _, loss in evals):
            return
        (best_step, best), (last_step, last) = min(evals, key=lambda e: e[1]), evals[-1]
        rise = last - best
        if (best_step == last_step or last < max(loss for _, loss in evals[1:-1]) or rise <= 0.1 * best
                or rise <= 0.25 * (evals[0][1] - best)):
            return
        trains = [(int(e.get("step", 0)), float(e["loss"])) for e in log_history if "loss" in e]
        at_best = [loss for step, loss in trains if step <= best_step]
        if not at_best or trains[-1][1] >= at_best[-1]:
            return
        self.warned = True
        log.warning("Overfitting: the final eval loss %.3f is %.0f%% above the best, %.3f at step %d, while train loss "
                    "kept falling, and the saved weights are the last step's: set train.early_stopping_patience (it "
                    "keeps the best evaluation's weights), or train fewer epochs or at a lower lr", last,
                    100 * rise / best, best, best_step)


class DivergenceGuard(TrainerCallback):
    """Stops a run whose loss or gradient norm becomes inf / NaN (a too-high lr, fp16 overflow): every later
    step trains on ruined weights, and the run would otherwise finish and save a NaN adapter with exit 0.

    Under fp16 loss scaling an inf gradient norm is routine: the scaler skips that step (the weights stay as they
    were) and halves its scale, several times at the start of a run. There only a non-finite loss, or gradients
    inf at every logged step over OVERFLOW_STEPS steps and at least OVERFLOW_LOGS logs running (the scale halved
    that often; two logs far apart that each met a skipped step are no proof), is divergence."""

    OVERFLOW_STEPS = 24
    OVERFLOW_LOGS = 3

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self.overflow_since: int | None = None
        self.overflow_logs = 0

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        from peftkit.errors import TrainingDivergedError

        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if not isinstance(value, (int, float)):
                continue
            if key == "grad_norm" and getattr(args, "fp16", False):
                if math.isfinite(value):
                    self.overflow_since, self.overflow_logs = None, 0
                    continue
                if self.overflow_since is None:
                    self.overflow_since = state.global_step
                self.overflow_logs += 1
                if (state.global_step - self.overflow_since < self.OVERFLOW_STEPS
                        or self.overflow_logs < self.OVERFLOW_LOGS):
                    continue
                what = (f"the grad norm has been {value} at every logged step from step {self.overflow_since} to "
                        f"{state.global_step} (fp16 loss scaling skips such steps and halves its scale: it did not "
                        "recover)")
            elif math.isfinite(value):
                continue
            else:
                what = f"the {key.replace('_', ' ')} is {value} at step {state.global_step}"
            raise TrainingDivergedError(
                f"training diverged: {what}. Lower "
                f"train.lr (now {self.lr:g}), keep train.max_grad_norm set, or train in float32; then start again "
                "with --force (checkpoints written before this step are in checkpoints/)")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss_curves(metrics: list[dict[str, Any]], out: Path, title: str = "") -> Path | None:
    """Train and eval loss against optimizer step, as a PNG."""
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), "o-" if len(train) < 3 else "-", label="train loss", color="#1f77b4")  # 1 point: a dot
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="#d62728")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (supervised tokens)")
    shown, family = _title_with_font(title or "loss")
    ax.set_title(shown, **({"fontfamily": family} if family else {}))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _title_with_font(title: str) -> tuple[str, str | None]:
    """The title and an installed font that has all its characters when the default one (DejaVu Sans) lacks some
    (a run named in Chinese); with none, the title without those characters (matplotlib would draw empty boxes and
    warn once per character)."""
    from matplotlib import font_manager, ft2font

    def characters(path: str) -> set[int]:
        try:
            return set(ft2font.FT2Font(path).get_charmap())
        except (OSError, RuntimeError, ValueError):
            return set()

    needed = {ord(ch) for ch in title if not ch.isspace()}
    default = characters(font_manager.findfont(font_manager.FontProperties()))
    if needed <= default:
        return title, None
    for font in font_manager.fontManager.ttflist:  # "Last Resort" maps every character to a box
        if not font.name.startswith("Last Resort") and needed <= characters(font.fname):
            return title, font.name
    kept = " ".join("".join(ch for ch in title if ord(ch) in default or ch.isspace()).split()).strip(" ():;,-")
    return kept or "loss", None


def early_stopping_callbacks(patience: int | None, has_eval: bool) -> list[TrainerCallback]:
    """transformers' early stopping on the eval loss, and a warning when the run is too short to evaluate at all."""
    if not patience or not has_eval:
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=patience), EvaluationWithinRun()]


class EvaluationWithinRun(TrainerCallback):
    """Early stopping evaluates (and checkpoints) every `train.eval_steps`: a run shorter than that never evaluates
    while it trains, so nothing can stop it and no checkpoint is kept on the way. Said once, at the start."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        every, steps = args.eval_steps, state.max_steps
        if args.eval_strategy == "steps" and every and steps and every >= steps:
            when = f"every {every} steps (train.eval_steps) and trains {steps}"
        elif args.eval_strategy == "epoch" and steps and state.num_train_epochs <= 1:
            when = "after each epoch and trains one"
        else:
            return
        fix = f"set train.eval_steps below {steps}, or" if steps > 1 else "train longer, or"
        log.warning("train.early_stopping_patience has nothing to watch: the run evaluates %s, so it never evaluates "
                    "(nor saves a checkpoint) before the end; %s drop early_stopping_patience", when, fix)
