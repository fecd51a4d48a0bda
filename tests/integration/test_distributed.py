"""DeepSpeed ZeRO on CPU: 2 processes over gloo through `peftkit train --nproc 2`, on the tiny model.

Global batch: 2 processes x batch 2 = one process x batch 4, with the same seed and data order
(`group_by_length: false`: length grouping forms groups per process batch), so the loss curves and
adapters must agree. The first launch may build DeepSpeed's CPU op (about 1.5 min, cached after).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from peftkit.config import load_recipe
from peftkit.train import checkpoints
from peftkit.train.run import train
from tests.train_procs import (
    adapter_tensors,
    complete_checkpoints,
    kill_tree,
    losses,
    peftkit,
    run,
    start,
    subprocess_env,
    tail,
    tiny_recipe_file,
    wait_for,
)

pytestmark = pytest.mark.integration

STEPS = 6
TWO_PROCS = {"max_steps": STEPS, "batch_size": 2, "group_by_length": False, "save_steps": 2}
ONE_PROC = {**TWO_PROCS, "batch_size": 4}


def _same_losses(got: dict[int, float], want: dict[int, float], tol: float = 2e-4) -> None:
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=tol), f"step {step}: {got[step]} vs {want[step]}"


def _same_adapter(got: Path, want: Path, atol: float = 2e-5) -> None:
    a, b = adapter_tensors(got), adapter_tensors(want)
    assert a.keys() == b.keys() and a
    for key in b:
        assert a[key].shape == b[key].shape and a[key].numel() > 0, key  # not the empty ZeRO-3 partitions
        assert a[key].abs().sum() > 0, key
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-3)


def _logits(model_dir: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def one_process(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Reference: one process, no DeepSpeed, batch 4."""
    folder = tmp_path_factory.mktemp("one-process")
    torch.set_num_threads(1)
    return train(load_recipe(tiny_recipe_file(folder, tiny_model_dir, train=ONE_PROC))).run_dir


@pytest.fixture(scope="module")
def zero2(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 processes, ZeRO-2, batch 2 each (the launcher may first build DeepSpeed's CPU op)."""
    folder = tmp_path_factory.mktemp("zero2")
    recipe = tiny_recipe_file(folder, tiny_model_dir, train=TWO_PROCS)
    result = run(peftkit("train", str(recipe), "--nproc", "2", "--deepspeed", "2"), subprocess_env(folder),
                 folder / "train.log", timeout=420)
    assert result.returncode == 0, tail(folder / "train.log")
    return folder / "run"


@pytest.mark.timeout(600)
def test_zero2_two_processes_match_one_process(zero2, one_process, tiny_model_dir):
    _same_losses(losses(zero2), losses(one_process))
    _same_adapter(zero2 / "adapter", one_process / "adapter")
    ids = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(tiny_model_dir, zero2 / "adapter", ids),
                               _logits(tiny_model_dir, one_process / "adapter", ids), atol=1e-4, rtol=1e-4)
    config = json.loads((zero2 / "deepspeed.json").read_text())
    assert config["zero_optimization"]["stage"] == 2
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["train_batch_size"] == "auto"
    summary, reference = json.loads((zero2 / "summary.json").read_text()), json.loads((one_process / "summary.json").read_text())
    assert summary["trained_tokens"] == reference["trained_tokens"]  # both ranks' tokens are counted
    assert len(list((zero2 / "tensorboard").glob("events.*"))) == 1  # rank 0 alone writes the run directory
    marker = checkpoints.read_marker(complete_checkpoints(zero2)[-1])
    progress = marker.pop("progress")
    assert marker == {"step": STEPS, "world_size": 2, "deepspeed_stage": 2}
    assert progress["steps"] == STEPS and progress["supervised_tokens"] == reference["trained_tokens"]  # summed over ranks


@pytest.mark.timeout(300)
def test_plain_ddp_two_processes_match_one_process(one_process, tiny_model_dir, tmp_path):
    """`--nproc 2` without DeepSpeed: torch DDP (gloo), every trainable parameter reduced each step."""
    recipe = tiny_recipe_file(tmp_path, tiny_model_dir, train={**TWO_PROCS, "epochs": 2})  # epochs: a warning
    result = run(peftkit("train", str(recipe), "--nproc", "2"), subprocess_env(tmp_path), tmp_path / "train.log", 240)
    assert result.returncode == 0, tail(tmp_path / "train.log")
    log_text = (tmp_path / "train.log").read_text()
    # said by the launcher's check; not again by each worker (it was said three times)
    assert log_text.count("train.epochs is ignored") == 1, log_text
    assert log_text.count("Loading weights: 100%") <= 1 and log_text.count("Trainable parameters") == 1
    run_dir = tmp_path / "run"
    assert not (run_dir / "deepspeed.json").exists()
    _same_losses(losses(run_dir), losses(one_process))
    _same_adapter(run_dir / "adapter", one_process / "adapter")
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval_loss"' in line]
    assert evals and all(e["eval_runtime"] > 0 for e in evals)  # not less the DDP wrap's time, after the first
    assert len({e["step"] for e in evals}) == len(evals)  # the final evaluation is not logged twice
    reference = [json.loads(line) for line in (one_process / "metrics.jsonl").read_text().splitlines()]
    assert evals[0]["step"] == 0, "the eval curve starts before training, as in one process"
    assert evals[0]["eval_loss"] == pytest.approx(next(r for r in reference if "eval_loss" in r)["eval_loss"], abs=1e-5)
    # --force reaches the workers, whose rank 0 replaces the finished run once the data is read.
    again = run(peftkit("train", str(recipe), "--nproc", "2", "--force"), subprocess_env(tmp_path), tmp_path / "again.log", 240)
    assert again.returncode == 0, tail(tmp_path / "again.log")
    _same_losses(losses(run_dir), losses(one_process))


@pytest.mark.timeout(400)
def test_killed_and_resumed_two_process_run_reports_the_global_train_loss(one_process, tiny_model_dir, tmp_path):
    """Losses between logs are still per process when a checkpoint records the run's loss sum (and when the
    Trainer adds its last ones): the summary must hold the mean over processes, as one process computes it."""
    recipe = tiny_recipe_file(tmp_path, tiny_model_dir, train={**TWO_PROCS, "logging_steps": 4})
    run_dir = tmp_path / "run"
    log = tmp_path / "first.log"
    proc = start(peftkit("train", str(recipe), "--nproc", "2"), subprocess_env(tmp_path, 1.0), log)
    wait_for(lambda: complete_checkpoints(run_dir), proc, log, 240, "a complete checkpoint")
    kill_tree(proc)
    assert checkpoints.step_of(complete_checkpoints(run_dir)[-1]) < STEPS
    result = run(peftkit("train", str(recipe), "--nproc", "2", "--resume"), subprocess_env(tmp_path),
                 tmp_path / "resume.log", 240)
    assert result.returncode == 0, tail(tmp_path / "resume.log")
    reference = losses(one_process)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_loss"] == pytest.approx(sum(reference.values()) / STEPS, abs=2e-4)


@pytest.mark.timeout(300)
def test_zero3_two_processes_save_the_gathered_adapter(one_process, tiny_model_dir, tmp_path):
    """ZeRO-3 partitions every parameter; the saved adapter (and modules_to_save) must be whole.

    No evaluation runs between training and saving (an eval forward would leave the weights gathered and
    hide the bug), and the persistence threshold is 0 so even the tiny LoRA matrices are partitioned:
    saving without gathering writes (0,)-shaped tensors here, as in trl#4416 / peft#2892 / peft#2450."""
    extra = {"adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "modules_to_save": ["lm_head"]}}
    no_eval = {"data": {"train": "train.jsonl", "eval_fraction": 0.0, "max_seq_len": 64}}
    reference = tmp_path / "reference"
    torch.set_num_threads(1)
    train(load_recipe(tiny_recipe_file(reference, tiny_model_dir, train={**ONE_PROC, "save_steps": 100},
                                       extra={**extra, **no_eval})))
    zero3 = {"stage": 3, "extra": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}}
    recipe = tiny_recipe_file(tmp_path, tiny_model_dir, train={**TWO_PROCS, "save_steps": 100},
                              extra={**extra, **no_eval, "deepspeed": zero3})
    result = run(peftkit("train", str(recipe), "--nproc", "2"), subprocess_env(tmp_path), tmp_path / "train.log", 240)
    assert result.returncode == 0, tail(tmp_path / "train.log")
    run_dir = tmp_path / "run"
    _same_losses(losses(run_dir), losses(reference / "run"))
    _same_adapter(run_dir / "adapter", reference / "run" / "adapter")
    saved = adapter_tensors(run_dir / "adapter")
    assert saved["base_model.model.lm_head.weight"].shape == (400, 32)
    config = json.loads((run_dir / "deepspeed.json").read_text())["zero_optimization"]
    assert config["stage"] == 3 and config["stage3_gather_16bit_weights_on_model_save"] is True
    # The Trainer's own checkpoint under ZeRO-3 holds the gathered adapter too.
    last = complete_checkpoints(run_dir)[-1]
    assert adapter_tensors(last).keys() == saved.keys()
    assert all(t.numel() > 0 for t in adapter_tensors(last).values())


@pytest.mark.timeout(600)
def test_sigkill_then_resume_under_zero2(zero2, tiny_model_dir, tmp_path):
    recipe = tiny_recipe_file(tmp_path, tiny_model_dir, train=TWO_PROCS)
    run_dir = tmp_path / "run"
    log = tmp_path / "first.log"
    proc = start(peftkit("train", str(recipe), "--nproc", "2", "--deepspeed", "2"), subprocess_env(tmp_path, 1.0), log)
    wait_for(lambda: complete_checkpoints(run_dir), proc, log, 300, "a complete checkpoint")
    kill_tree(proc)  # launcher, torchrun and both workers, at once
    assert not (run_dir / "summary.json").exists()
    killed_at = checkpoints.step_of(complete_checkpoints(run_dir)[-1])
    assert killed_at < STEPS
    assert list((run_dir / "checkpoints" / f"checkpoint-{killed_at}").glob("global_step*/zero_pp_rank_1_*optim_states.pt"))

    result = run(peftkit("train", str(recipe), "--nproc", "2", "--deepspeed", "2", "--resume"), subprocess_env(tmp_path),
                 tmp_path / "resume.log", 300)
    assert result.returncode == 0, tail(tmp_path / "resume.log")
    _same_losses(losses(run_dir), losses(zero2), tol=1e-5)
    _same_adapter(run_dir / "adapter", zero2 / "adapter", atol=1e-6)


@pytest.mark.timeout(300)
def test_ctrl_c_under_the_launcher_checkpoints_all_ranks(tiny_model_dir, tmp_path):
    recipe = tiny_recipe_file(tmp_path, tiny_model_dir, train={**TWO_PROCS, "save_steps": 100, "max_steps": 40})
    run_dir = tmp_path / "run"
    log = tmp_path / "train.log"
    proc = start(peftkit("train", str(recipe), "--nproc", "2", "--deepspeed", "2"), subprocess_env(tmp_path, 0.5), log)
    wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and losses(run_dir), proc, log, 240, "the first step")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, tail(log)
    said = " ".join(tail(log, 20_000).split())
    assert "training interrupted at step" in said and "--nproc 2 --deepspeed 2 --resume" in said, said[-2000:]
    saved = complete_checkpoints(run_dir)
    assert len(saved) == 1 and checkpoints.step_of(saved[0]) < 40
    assert checkpoints.read_marker(saved[0])["world_size"] == 2
    assert list(saved[0].glob("global_step*/zero_pp_rank_1_*optim_states.pt"))


@pytest.mark.timeout(300)
def test_qlora_zero3_two_processes_match_one_process(tiny_model_dir, tmp_path):
    """4-bit base + ZeRO-3: peftkit stores the packed weights in the compute dtype (bnb_4bit_quant_storage)."""
    extra = {"adapter": {"method": "qlora", "r": 4, "alpha": 8, "dropout": 0.0, "gradient_checkpointing": False}}
    steps = {"max_steps": 4, "save_steps": 100}
    reference = tmp_path / "reference"
    torch.set_num_threads(1)
    train(load_recipe(tiny_recipe_file(reference, tiny_model_dir, train={**ONE_PROC, **steps}, extra=extra)))
    recipe = tiny_recipe_file(tmp_path, tiny_model_dir, train={**TWO_PROCS, **steps}, extra={**extra, "deepspeed": {"stage": 3}})
    result = run(peftkit("train", str(recipe), "--nproc", "2"), subprocess_env(tmp_path), tmp_path / "train.log", 240)
    assert result.returncode == 0, tail(tmp_path / "train.log")
    got, want = losses(tmp_path / "run"), losses(reference / "run")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=2e-4)
    _same_adapter(tmp_path / "run" / "adapter", reference / "run" / "adapter")
