"""Free space for a run's checkpoints is checked before the first step: the estimate matches what the run writes,
a disk that cannot hold one checkpoint refuses the run (leaving nothing that blocks the same command again), and
one that may fill up later gets a warning."""

from __future__ import annotations

import logging
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from peftkit.config import recipe_from_dict
from peftkit.errors import RunDirError
from peftkit.train import checkpoints, disk_space
from peftkit.train.run import train

Usage = namedtuple("Usage", "total used free")


def _file_bytes(folder: Path, *names: str) -> int:
    return sum((folder / name).stat().st_size for name in names)


ADAPTERS = {
    "lora": {"method": "lora", "r": 4, "alpha": 8},
    "full": {"method": "full"},
    # peft saves the embedding matrix with a LoRA on it
    "lora-on-embeddings": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "embed_tokens"]},
    # the optimizer gets states for the block unfrozen later too
    "partial-unfreezing": {"method": "partial", "train_last_layers": 2, "train_head": False,
                           "unfreeze_schedule": {"every_steps": 2, "start_layers": 1}},
    # the adapter holds the projected prefix; checkpoints keep the encoder (embedding and MLP) too
    "prefix-projection": {"method": "prefix_tuning", "num_virtual_tokens": 4, "prefix_projection": True},
}


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


@pytest.mark.parametrize("name", ADAPTERS)
def test_estimate_matches_what_training_writes(tiny_recipe, name, monkeypatch):
    seen: list[disk_space.RunWrites] = []
    check = disk_space.check_free_space
    monkeypatch.setattr(disk_space, "check_free_space",
                        lambda run_dir, writes, **kw: (seen.append(writes), check(run_dir, writes, **kw)))
    run = train(recipe_from_dict({**tiny_recipe, "adapter": ADAPTERS[name],
                                  "train": {**tiny_recipe["train"], "epochs": 3, "save_total_limit": 1}})).run_dir
    writes = seen[-1]  # the check before training (full and partial are also checked once the model is loaded)
    saved = checkpoints.checkpoint_dirs(run)
    assert len(saved) == 1  # save_total_limit
    on_disk = _weights_bytes(saved[0]) + (saved[0] / "optimizer.pt").stat().st_size
    assert writes.checkpoint - disk_space.SMALL_FILES_BYTES == pytest.approx(on_disk, rel=0.1)
    final = next(folder for folder in (run / "adapter", run / "model") if folder.is_dir())
    tokenizer = sum(p.stat().st_size for p in (run / "tokenizer").iterdir())
    assert tokenizer > 0 and writes.weights == pytest.approx(_weights_bytes(final) + tokenizer, rel=0.1)
    assert writes.checkpoints_at_once == 2  # three epoch saves, one kept: the newest is written before the oldest goes


@pytest.mark.parametrize(("kwargs", "saves"), [
    ({"epochs": 2, "max_steps": None, "save_steps": None}, 2),
    ({"epochs": 2.5, "max_steps": None, "save_steps": None}, 3),  # the cut epoch ends with a save
    ({"epochs": 3, "max_steps": 2, "save_steps": None}, 1),  # max_steps inside the first epoch: saved at its end
    ({"epochs": 3, "max_steps": 10, "save_steps": 4}, 3),  # steps 4 and 8, and the last one
    ({"epochs": 1, "max_steps": None, "save_steps": 50}, 1),  # 5 steps, fewer than save_steps: the last one
])
def test_saves_in_run(kwargs, saves):
    # 40 rows, batch 4 on 2 processes, accumulating 1: 5 steps an epoch
    assert disk_space.saves_in_run(rows=40, batch_size=4, grad_accum=1, world_size=2, **kwargs) == saves


def test_a_disk_that_cannot_hold_one_checkpoint_refuses_the_run_before_training(tiny_recipe, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9, 300_000))
    with pytest.raises(RunDirError) as refused:
        train(recipe_from_dict(tiny_recipe))
    message = " ".join(str(refused.value).split())
    run = Path(tiny_recipe["output_dir"]).resolve()
    assert message.startswith(f"not enough free space for this run in {run}: 300.0 KB free, and it writes at least ")
    assert "free some space there, or set output_dir to a disk with more room" in message
    assert not (run / "metrics.jsonl").exists() and not checkpoints.checkpoint_dirs(run)
    monkeypatch.setattr(shutil, "disk_usage", real)
    result = train(recipe_from_dict(tiny_recipe))  # the same command, once there is room: no --force needed
    assert (result.run_dir / "summary.json").is_file()


def test_a_disk_that_may_fill_at_a_later_save_warns(tiny_recipe, monkeypatch, caplog):
    seen: list[disk_space.RunWrites] = []
    check = disk_space.check_free_space

    def with_room_for_one(run_dir, writes, **kw):
        seen.append(writes)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9, writes.at_least + 1))
        check(run_dir, writes, **kw)

    monkeypatch.setattr(disk_space, "check_free_space", with_room_for_one)
    with caplog.at_level(logging.WARNING, logger="peftkit.train.disk_space"):
        train(recipe_from_dict(tiny_recipe))
    assert seen[0].checkpoints_at_once == 2 and seen[0].at_most > seen[0].at_least  # two epochs, limit 2
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "peftkit.train.disk_space"]
    assert "this run may write" in warning and "2 checkpoints of" in warning and "train.save_total_limit is 2" in warning


def test_resumed_run_counts_the_checkpoints_already_on_disk(tiny_recipe):
    from peftkit.config import recipe_from_dict as load

    import torch

    recipe = load(tiny_recipe)
    model = torch.nn.Linear(10, 10)  # 110 trainable fp32 parameters
    fresh = disk_space.run_writes(model, recipe, rows=16, world_size=1, save_steps=None, deepspeed=False)
    resumed = disk_space.run_writes(model, recipe, rows=16, world_size=1, save_steps=None, deepspeed=False,
                                    existing_checkpoints=2)
    # two tensors, weight and bias: their header entries and state records
    overhead = 2 * (disk_space._HEADER_BYTES + disk_space._STATE_RECORD_BYTES) + disk_space.SMALL_FILES_BYTES
    assert fresh.checkpoint == 110 * 4 * 3 + overhead  # weights and AdamW's two states
    assert (fresh.checkpoints_at_once, resumed.checkpoints_at_once) == (2, 1)
    eight_bit = recipe.model_copy(update={"train": recipe.train.model_copy(update={"optimizer": "adamw_8bit"})})
    assert disk_space.run_writes(model, eight_bit, rows=16, world_size=1, save_steps=None,
                                 deepspeed=False).checkpoint == 110 * (4 + 2) + overhead
    # ZeRO: fp32 master weights and two states, and its model-states file holds the weights once more
    assert disk_space.run_writes(model, recipe, rows=16, world_size=1, save_steps=None,
                                 deepspeed=True).checkpoint == 110 * (4 + 12 + 4) + 2 * disk_space._HEADER_BYTES + overhead
    every_step = {"rows": 16, "world_size": 1, "save_steps": 1, "deepspeed": False}  # 8 saves
    assert disk_space.run_writes(model, recipe, **every_step).checkpoints_at_once == 3  # save_total_limit 2, plus one
    assert disk_space.run_writes(model, recipe, **every_step, keeps_best=True).checkpoints_at_once == 4


def test_force_on_a_disk_too_small_for_the_whole_model_keeps_the_earlier_run(tiny_recipe, monkeypatch):
    """Full fine-tuning saves the whole model: checked once it is loaded, before --force removes the earlier run
    (whose files count as free space, since the new run would replace them)."""
    recipe = {**tiny_recipe, "adapter": {"method": "full"}}
    earlier = train(recipe_from_dict(recipe)).run_dir
    kept = disk_space._tree_bytes(earlier)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9, 1000))
    with pytest.raises(RunDirError, match=r"MB free \(with what the earlier run there gives back\), and it writes"):
        train(recipe_from_dict(recipe), force=True)
    assert (earlier / "summary.json").is_file() and disk_space._tree_bytes(earlier) == kept
