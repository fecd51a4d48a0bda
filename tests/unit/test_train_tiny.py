"""End-to-end training on the tiny model: run directory contents, loss, determinism."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from peftkit.config import recipe_from_dict
from peftkit.errors import RunDirError
from peftkit.train.run import peak_memory_mb, train
from tests.conftest import assert_speed_leaves_out_evaluation


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def test_train_writes_self_describing_run_dir(tiny_recipe):
    result = train(recipe_from_dict(tiny_recipe))
    run = result.run_dir
    for name in ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "recipe.yaml", "summary.json",
                 "metrics.jsonl", "plots/loss.png", "README.md", "tokenizer/tokenizer_config.json", "heldout.jsonl"]:
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((run / "summary.json").read_text())
    for key in ["trainable_params", "trainable_share", "trained_tokens", "tokens_per_second", "peak_memory_mb",
                "eval_loss_before", "eval_loss_after", "heldout_accuracy_before", "heldout_accuracy_after", "wall_seconds"]:
        assert key in summary, key
    assert 0 < summary["trainable_share"] < 0.5
    assert summary["trained_tokens"] > 0
    # The run's peak is this process's high-water mark at the end of training (it trained in this process; the
    # summary rounds it to 0.1 MB).
    assert 100 < summary["peak_memory_mb"] <= round(peak_memory_mb("cpu"), 1)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["epochs"] == summary["epochs_trained"] == tiny_recipe["train"]["epochs"]
    assert "`plots/loss.png`" in (run / "README.md").read_text() and "`heldout.jsonl`" in (run / "README.md").read_text()
    assert not list(run.glob(".tmp-*")), "temporary directories must not be left behind"
    # The last epoch's evaluation is the shipped model's: reused for the summary, not run (and logged) twice.
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval_loss"' in line]
    assert len({e["step"] for e in evals}) == len(evals) == 3  # before training, then each epoch
    assert summary["eval_loss_after"] == pytest.approx(evals[-1]["eval_loss"])
    assert all(e["eval_runtime"] > 0 for e in evals)
    # The evaluations during training are part of train_seconds but not of the training speed (timed with
    # perf_counter: eval_runtime reads the wall clock). Those before and after training are not counted.
    during = sum(e["eval_runtime"] for e in evals if e["step"] > 0)
    assert during > 0 and 0 < summary["eval_seconds_in_training"] < summary["train_seconds"]
    assert_speed_leaves_out_evaluation(summary, summary["trained_tokens"])


def test_same_seed_gives_same_loss_curve(tiny_recipe, tmp_path):
    first = train(recipe_from_dict({**tiny_recipe, "output_dir": str(tmp_path / "a")}))
    second = train(recipe_from_dict({**tiny_recipe, "output_dir": str(tmp_path / "b")}))
    assert _losses(first.run_dir) == pytest.approx(_losses(second.run_dir), abs=1e-6)


def test_existing_finished_run_is_not_overwritten(tiny_recipe):
    recipe = recipe_from_dict({**tiny_recipe, "model": {**tiny_recipe["model"], "revision": "v1.0"},
                               "train": {**tiny_recipe["train"], "max_steps": 1}, "eval": {"before": False}})
    run_dir = train(recipe).run_dir
    # The base model's revision travels with the adapter (AutoPeftModel loads the base at it).
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["revision"] == "v1.0"
    with pytest.raises(RunDirError, match="--force"):
        train(recipe)
    train(recipe, force=True)


def test_neftune_noise_changes_training(tiny_recipe, tmp_path):
    steps = {**tiny_recipe["train"], "max_steps": 3}
    plain = train(recipe_from_dict({**tiny_recipe, "train": steps, "output_dir": str(tmp_path / "plain")}))
    noisy_recipe = recipe_from_dict({**tiny_recipe, "train": {**steps, "neftune_noise_alpha": 5.0},
                                     "output_dir": str(tmp_path / "noisy")})
    noisy = train(noisy_recipe)
    assert _losses(noisy.run_dir) != pytest.approx(_losses(plain.run_dir), abs=1e-6)


def test_packed_training_follows_the_padded_loss_curve(tiny_recipe, tmp_path):
    """`train.packing` end to end: the same batches as one padding-free sequence each, the same losses."""
    steps = {**tiny_recipe["train"], "max_steps": 4, "logging_steps": 1}
    padded = train(recipe_from_dict({**tiny_recipe, "train": steps, "output_dir": str(tmp_path / "padded")}))
    packed = train(recipe_from_dict({**tiny_recipe, "train": {**steps, "packing": True}, "output_dir": str(tmp_path / "packed")}))
    assert len(_losses(packed.run_dir)) == 4
    assert _losses(packed.run_dir) == pytest.approx(_losses(padded.run_dir), rel=1e-4)


def test_optimizer_choice_reaches_the_trainer(tiny_recipe, tmp_path):
    """`train.optimizer: adamw_8bit` trains with bitsandbytes' 8-bit AdamW (its CPU kernels here)."""
    import bitsandbytes as bnb
    from transformers import TrainerCallback

    seen = []

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            seen.append(optimizer)

    recipe = recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 3, "optimizer": "adamw_8bit"}})
    result = train(recipe, extra_callbacks=[Capture()])
    inner = getattr(seen[0], "optimizer", seen[0])  # accelerate wraps it
    assert isinstance(inner, bnb.optim.AdamW) and inner.args.optim_bits == 8  # transformers' adamw_8bit
    assert all("state1" in state for state in inner.state.values()) and inner.state  # it stepped
    # (bitsandbytes keeps tensors under min_8bit_size = 4096 elements, like these tiny LoRA matrices, in 32 bits)
    assert len(_losses(result.run_dir)) == 3


def test_a_diverging_run_stops_with_the_step_instead_of_saving_a_nan_adapter(tiny_recipe):
    from peftkit.errors import TrainingDivergedError

    recipe = recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 8, "lr": 1e12,
                                                        "max_grad_norm": 0.0, "warmup_ratio": 0.0},
                               "eval": {"before": False}})
    with pytest.raises(TrainingDivergedError, match=r"training diverged: the (loss|grad norm) is (nan|inf) at step \d") as caught:
        train(recipe)
    assert "train.lr (now 1e+12)" in str(caught.value)
    run_dir = Path(tiny_recipe["output_dir"])
    assert not (run_dir / "adapter").exists() and not (run_dir / "summary.json").exists()


def test_fp16_loss_scaling_skipping_steps_is_not_divergence():
    """Under fp16 AMP (T4 / V100) the Trainer logs the unscaled grad norm of a step the scaler skipped: inf, several
    times at the start of a run. Only gradients still inf after the scale halved many times, or a loss that is not
    finite, stop the run; in float32 and bf16 the first inf does."""
    from types import SimpleNamespace

    from peftkit.errors import TrainingDivergedError
    from peftkit.train.callbacks import DivergenceGuard

    def log(guard: DivergenceGuard, step: int, fp16: bool, **logs: float) -> None:
        guard.on_log(SimpleNamespace(fp16=fp16), SimpleNamespace(global_step=step), None, logs=logs)

    guard = DivergenceGuard(1e-4)
    for step in range(1, 6):
        log(guard, step, True, loss=1.8, grad_norm=float("inf"))
    log(guard, 6, True, loss=1.7, grad_norm=0.9)  # the scale found: the streak ends
    for step in range(7, 7 + DivergenceGuard.OVERFLOW_STEPS):
        log(guard, step, True, loss=1.7, grad_norm=float("inf"))
    with pytest.raises(TrainingDivergedError, match=r"grad norm has been inf at every logged step from step 7 to 31"):
        log(guard, 7 + DivergenceGuard.OVERFLOW_STEPS, True, loss=1.7, grad_norm=float("inf"))
    sparse = DivergenceGuard(1e-4)  # logging_steps 25: two logs that each met a skipped step prove nothing
    log(sparse, 25, True, loss=1.7, grad_norm=float("inf"))
    log(sparse, 50, True, loss=1.7, grad_norm=float("inf"))
    with pytest.raises(TrainingDivergedError, match="from step 25 to 75"):
        log(sparse, 75, True, loss=1.7, grad_norm=float("inf"))
    with pytest.raises(TrainingDivergedError, match="the loss is nan at step 2"):
        log(DivergenceGuard(1e-4), 2, True, loss=float("nan"), grad_norm=1.0)
    with pytest.raises(TrainingDivergedError, match="the grad norm is inf at step 1"):
        log(DivergenceGuard(1e-4), 1, False, loss=1.8, grad_norm=float("inf"))


def test_a_run_without_held_out_questions_reports_no_empty_accuracy(tiny_recipe, capsys):
    from rich.console import Console

    from peftkit.train.report import print_run_report

    recipe = recipe_from_dict({**tiny_recipe, "data": {**tiny_recipe["data"], "heldout": None},
                               "train": {**tiny_recipe["train"], "max_steps": 1}, "eval": {"before": False}})
    result = train(recipe)
    card = (result.run_dir / "README.md").read_text()
    assert "held-out fact accuracy" not in card and "(1 thread)" in card
    # eval_fraction 0.25 of the 16 records: the card says the file has more than the trained examples
    assert "(12 examples; 4 more held out as the eval split) |" in card
    print_run_report(Console(width=200), result.run_dir, result.summary)
    assert "held-out" not in capsys.readouterr().out


def test_a_run_shorter_than_logging_steps_logs_its_loss_at_its_checkpoint_and_its_card_lists_only_what_was_written(
        tiny_recipe, caplog):
    """Every checkpoint is a logging point (CheckpointBoundaries), so a run of fewer steps than `logging_steps` still
    logs its loss at the checkpoint it ends with (it logged none, and had no loss plot)."""
    import logging

    recipe = recipe_from_dict({**tiny_recipe, "data": {**tiny_recipe["data"], "heldout": None, "eval_fraction": 0},
                               "train": {**tiny_recipe["train"], "max_steps": 2, "logging_steps": 10},
                               "eval": {"before": False}})
    with caplog.at_level(logging.INFO, logger="peftkit.train.run"):
        run_dir = train(recipe).run_dir
    assert [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r] == [2]
    assert (run_dir / "plots" / "loss.png").exists() and not (run_dir / "heldout.jsonl").exists()
    assert "No loss was logged" not in caplog.text
    files = next(line for line in (run_dir / "README.md").read_text().splitlines() if line.startswith("Files:"))
    assert "loss.png" in files and "heldout.jsonl" not in files and files.endswith("`summary.json`.")
    assert json.loads((run_dir / "summary.json").read_text())["epochs_trained"] < tiny_recipe["train"]["epochs"]


def test_the_run_report_names_what_was_held_out(tiny_recipe, capsys):
    from rich.console import Console

    from peftkit.train.report import print_run_report

    recipe = recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 1}, "eval": {"before": False}})
    result = train(recipe)
    print_run_report(Console(width=200), result.run_dir, result.summary)
    assert "held-out fact accuracy (2 q)" in capsys.readouterr().out
    print_run_report(Console(width=200), result.run_dir, {**result.summary, "task": "sequence_classification"})
    assert "held-out label accuracy (2 texts)" in capsys.readouterr().out


def test_peak_memory_follows_what_the_process_touched():
    """The summary's and the benchmarks' peak memory: a fresh process's mark rises by what it writes, and a
    process started by a larger one does not report its parent's peak (getrusage's ru_maxrss does: CI's 3.4 GB
    test runner made a worker's 300 MB invisible)."""
    parent_block = bytearray(1600 * 2**20)  # zero pages are not resident until written
    parent_block[::4096] = b"x" * len(parent_block[::4096])
    code = ("from peftkit.train.run import peak_memory_mb; before = peak_memory_mb('cpu'); "
            "block = bytearray(b'x' * (300 * 2**20)); print(before, peak_memory_mb('cpu'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    del parent_block
    before, after = map(float, out)
    assert 50 < before < 1500 and after - before >= 290
