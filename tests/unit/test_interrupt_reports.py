"""Interrupts a tester reported: an epoch-wise evaluation added by a stop mid-epoch, a signal during the last step's
save, `train.logging_steps` changed on resume, and the end-of-training record's rates after a resume."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from peftkit.config import recipe_from_dict
from peftkit.train.run import train
from peftkit.train.signals import TrainingInterrupted

torch.set_num_threads(1)


class SignalAt(TrainerCallback):
    """Sends this process SIGINT at the end of step `step`, or during the save of the last step (`on="last_save"`)."""

    def __init__(self, step: int | None = None, on: str = "step") -> None:
        self.step, self.on = step, on

    def on_step_end(self, args, state, control, **kwargs):
        if self.on == "step" and state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)

    def on_save(self, args, state, control, **kwargs):
        if self.on == "last_save" and state.global_step == state.max_steps:
            os.kill(os.getpid(), signal.SIGINT)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _eval_steps(run_dir: Path) -> list[int]:
    """Steps of the evaluations during training (step 0's is the untrained model's)."""
    return [r["step"] for r in _records(run_dir) if "eval_loss" in r and r["step"] > 0]


def _recipe(tiny_recipe: dict, name: str, **train_settings) -> dict:
    return {**tiny_recipe, "output_dir": str(Path(tiny_recipe["output_dir"]).parent / name), "eval": {"before": False},
            "train": {**tiny_recipe["train"], "epochs": 3, **train_settings}}


def test_a_stop_mid_epoch_adds_no_epoch_evaluation_and_the_resumed_run_evaluates_as_an_uninterrupted_one(tiny_recipe):
    reference = train(recipe_from_dict(_recipe(tiny_recipe, "whole")))
    expected = _eval_steps(reference.run_dir)
    per_epoch = expected[-1] // 3
    assert per_epoch >= 3 and expected == [per_epoch, 2 * per_epoch, 3 * per_epoch]  # epoch-wise evaluation
    recipe = recipe_from_dict(_recipe(tiny_recipe, "stopped"))
    with pytest.raises(TrainingInterrupted) as stopped:
        train(recipe, extra_callbacks=[SignalAt(per_epoch + 1)])  # seen at the next step's end: mid-epoch 2
    run_dir = stopped.value.run_dir
    assert stopped.value.step == per_epoch + 2 and _eval_steps(run_dir) == [per_epoch]
    resumed = train(recipe, resume=True)
    assert _eval_steps(run_dir) == expected
    assert resumed.summary["eval_loss_after"] == pytest.approx(reference.summary["eval_loss_after"], rel=1e-4)


def test_a_signal_during_the_last_steps_save_stops_the_run_resumable(tiny_recipe):
    recipe = recipe_from_dict(_recipe(tiny_recipe, "last", epochs=1))
    with pytest.raises(TrainingInterrupted) as stopped:
        train(recipe, extra_callbacks=[SignalAt(on="last_save")])
    run_dir = stopped.value.run_dir
    assert not (run_dir / "summary.json").exists()  # it stopped: no held-out answers, samples or summary
    assert json.loads((run_dir / "interrupted.json").read_text())["step"] == stopped.value.step
    finished = train(recipe, resume=True)  # finishes from the last checkpoint, training nothing more
    assert finished.summary["steps"] == stopped.value.step and (run_dir / "summary.json").is_file()


def test_logging_steps_changed_on_resume_is_used_and_the_end_record_rates_cover_the_run(tiny_recipe):
    recipe = _recipe(tiny_recipe, "logging", max_steps=8, save_steps=100)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(recipe_from_dict(recipe), extra_callbacks=[SignalAt(2)])
    assert stopped.value.step == 3
    run_dir = stopped.value.run_dir
    resumed = {**recipe, "train": {**recipe["train"], "logging_steps": 2}}
    train(recipe_from_dict(resumed), resume=True)
    logged = [r["step"] for r in _records(run_dir) if "loss" in r and "eval_loss" not in r]
    assert logged == [1, 2, 3, 4, 6, 8]
    end = next(r for r in _records(run_dir) if "train_runtime" in r)
    assert end["train_steps_per_second"] == pytest.approx(8 / end["train_runtime"], rel=0.01)
    assert end["train_samples_per_second"] == pytest.approx(8 * 4 / end["train_runtime"], rel=0.01)


def test_the_launcher_forwards_the_signal_it_got(monkeypatch):
    """SIGTERM to `peftkit train --nproc N` reaches the workers as SIGTERM: the run exits 143 and records it, as a
    batch scheduler expects; a third signal kills them."""
    import time
    from types import SimpleNamespace

    from peftkit.train.launch import _Forwarder

    sent: list[int] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append(sig))
    forward = _Forwarder(SimpleNamespace(pid=12345), direct=True)
    forward(signal.SIGTERM, None)
    forward.last = time.monotonic() - 5
    forward(signal.SIGINT, None)
    forward.last = time.monotonic() - 5
    forward(signal.SIGTERM, None)
    assert sent == [signal.SIGTERM, signal.SIGINT, signal.SIGKILL]


def test_an_interrupt_before_the_workers_listen_still_stops_them(monkeypatch, tmp_path):
    """Ctrl-C in the first seconds of `--nproc`: torchrun has no workers yet, or they still ignore SIGINT as it started
    them. The launcher writes a flag before forwarding, and a worker finding it once its handler is in place stops at
    once (the whole run trained to the end before)."""
    import subprocess
    import sys
    from types import SimpleNamespace

    from peftkit.train.launch import INTERRUPT_FLAG_ENV, WORKER_ENV, _Forwarder

    flag = tmp_path / "flag"
    seen: list[bool] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: seen.append(flag.exists()))
    _Forwarder(SimpleNamespace(pid=12345), direct=True, flag=flag)(signal.SIGINT, None)
    assert seen == [True]  # written before the signal went out
    env = {**os.environ, WORKER_ENV: "1", INTERRUPT_FLAG_ENV: str(flag)}
    worker = subprocess.run([sys.executable, "-m", "peftkit.cli", "train", str(tmp_path / "never-read.yaml")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert worker.returncode == 130, worker.stderr
    assert "never-read.yaml" not in worker.stderr  # stopped before reading the recipe, let alone the model
    flag.unlink()
    worker = subprocess.run([sys.executable, "-m", "peftkit.cli", "train", str(tmp_path / "never-read.yaml")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert worker.returncode == 2 and "never-read.yaml" in worker.stderr  # no flag: the worker goes on


def test_a_multi_process_runs_card_says_how_many_processes_trained():
    from peftkit.train.model_card import _workers

    assert _workers({"threads": 2}) == "2 threads"
    assert _workers({"threads": 1, "processes": 2, "global_batch_size": 8}) == "2 processes x 1 thread, global batch 8"
