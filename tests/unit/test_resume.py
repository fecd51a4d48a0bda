"""Kill-safe checkpoints and resume: SIGKILL mid-run, Ctrl-C, incomplete checkpoints, --resume semantics.

The end-to-end tests run `peftkit train` in a subprocess (slowed by tests/train_procs.py's
sitecustomize so the test can act between checkpoints) and compare against an uninterrupted run.
"""

from __future__ import annotations

import os
import sys

import json
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from peftkit.config import load_recipe
from peftkit.errors import RunDirError
from peftkit.train import checkpoints
from peftkit.train.launch import LaunchError, raise_for_worker_exit, resolve_resume, resume_command
from peftkit.train.run import train
from peftkit.train.signals import TrainingInterrupted
from tests.train_procs import (
    adapter_tensors,
    complete_checkpoints,
    losses,
    peftkit,
    run,
    start,
    subprocess_env,
    tail,
    tiny_recipe_file,
    wait_for,
)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every resumed run must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    recipe = load_recipe(tiny_recipe_file(folder, tiny_model_dir))
    torch.set_num_threads(1)
    return train(recipe).run_dir


def _assert_same_run(resumed: Path, reference: Path) -> None:
    got, want = losses(resumed), losses(reference)
    assert sorted(got) == sorted(want) == list(range(1, 13))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-5), f"step {step}"
    a, b = adapter_tensors(resumed / "adapter"), adapter_tensors(reference / "adapter")
    assert a.keys() == b.keys() and a
    for key in b:
        assert a[key].shape == b[key].shape and a[key].numel() > 0
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    assert _tensorboard_steps(resumed) == _tensorboard_steps(reference)  # no step twice, none lost


def _tensorboard_steps(run_dir: Path) -> dict[str, list[int]]:
    """Each scalar tag's steps as the event files hold them (the TensorBoard app would hide repeats); each session
    writes its settings (`args/text_summary`) once."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps: dict[str, list[int]] = {}
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if not value.tag.endswith("text_summary"):
                    steps.setdefault(value.tag, []).append(event.step)
    return {tag: sorted(found) for tag, found in steps.items()}


@pytest.mark.timeout(240)
def test_sigkill_then_resume_matches_uninterrupted_run(tiny_model_dir, tmp_path, reference):
    recipe = tiny_recipe_file(tmp_path, tiny_model_dir)
    run_dir = tmp_path / "run"
    proc = start(peftkit("train", str(recipe)), subprocess_env(tmp_path, step_delay=0.4), tmp_path / "first.log")
    first = wait_for(lambda: complete_checkpoints(run_dir), proc, tmp_path / "first.log", 120, "a complete checkpoint")
    logged_after = lambda: max(losses(run_dir), default=0) > checkpoints.step_of(first[-1])  # noqa: E731
    wait_for(logged_after, proc, tmp_path / "first.log", 60, "a step logged after the checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists(), "the kill must land before the run finished"
    killed_at = checkpoints.step_of(first[-1])
    assert killed_at < 12
    # A save cut short by the kill looks like this: resume must delete it, not load it.
    half_written = run_dir / "checkpoints" / "checkpoint-99"
    half_written.mkdir()
    (half_written / "adapter_model.safetensors").write_bytes(b"\0" * 10)

    result = run(peftkit("train", str(recipe), "--resume"), subprocess_env(tmp_path), tmp_path / "resume.log", 180)
    assert result.returncode == 0, tail(tmp_path / "resume.log")
    assert not half_written.exists()
    said = " ".join(tail(tmp_path / "resume.log", 200_000).split())
    assert "Removed incomplete checkpoint" in said and "Resuming from" in said
    _assert_same_run(run_dir, reference)


@pytest.mark.timeout(240)
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tiny_model_dir, tmp_path, reference):
    recipe = tiny_recipe_file(tmp_path, tiny_model_dir)
    run_dir = tmp_path / "run"
    log = tmp_path / "first.log"
    proc = start(peftkit("train", str(recipe), "train.save_steps=5"), subprocess_env(tmp_path, step_delay=0.4), log)
    wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and losses(run_dir), proc, log, 120, "the first step")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, tail(log)
    output = tail(log)
    assert "stopped: training interrupted at step" in output and "--resume" in output, output
    saved = complete_checkpoints(run_dir)
    record = json.loads((run_dir / "interrupted.json").read_text())
    step = record["step"]
    assert record["resume"] == f"peftkit train {run_dir} --resume" and record["signal"] == "SIGINT"
    assert saved and checkpoints.step_of(saved[-1]) == step
    assert step % 5 != 0, "the checkpoint must come from the interrupt, not from save_steps"
    assert not (run_dir / "summary.json").exists() and not (run_dir / "adapter").exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if "train_runtime" in r], "no end-of-training record for a stopped session"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert "train/train_loss" not in EventAccumulator(str(run_dir / "tensorboard")).Reload().Tags()["scalars"]

    result = run(peftkit("train", str(recipe), "train.save_steps=5", "--resume"), subprocess_env(tmp_path),
                 tmp_path / "resume.log", 180)
    assert result.returncode == 0, tail(tmp_path / "resume.log")
    assert not (run_dir / "interrupted.json").exists()
    _assert_same_run(run_dir, reference)


# ------------------------------------------------------------------------------------------------
# Fast unit tests of the pieces


def _checkpoint(run_dir: Path, step: int, *, complete: bool = True, world_size: int = 1,
                deepspeed_stage: int | None = None) -> Path:
    folder = run_dir / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({"step": step}, folder / name)
    if deepspeed_stage is not None:
        (folder / f"global_step{step}").mkdir()
    if complete:
        (folder / "trainer_state.json").write_text("{}")
        (folder / checkpoints.MARKER).write_text(
            json.dumps({"step": step, "world_size": world_size, "deepspeed_stage": deepspeed_stage}))
    return folder


def test_prepare_resume_drops_incomplete_checkpoints_and_later_metrics(tmp_path):
    _checkpoint(tmp_path, 2)
    good = _checkpoint(tmp_path, 4)
    marker_only = _checkpoint(tmp_path, 6, complete=False)
    (marker_only / checkpoints.MARKER).write_text("6")  # marker but no trainer_state.json: not complete
    _checkpoint(tmp_path, 8, complete=False)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)))
    (tmp_path / "interrupted.json").write_text("{}")

    assert checkpoints.prepare_resume(tmp_path) == good
    assert [p.name for p in checkpoints.checkpoint_dirs(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not (tmp_path / "interrupted.json").exists()


def test_resume_refuses_a_checkpoint_from_another_setup(tmp_path):
    _checkpoint(tmp_path, 2, world_size=2, deepspeed_stage=2)
    with pytest.raises(RunDirError, match="--nproc 2"):
        checkpoints.prepare_resume(tmp_path, world_size=1, deepspeed_stage=2)
    with pytest.raises(RunDirError, match="same `deepspeed:` setting"):
        checkpoints.prepare_resume(tmp_path, world_size=2, deepspeed_stage=None)
    assert checkpoints.prepare_resume(tmp_path, world_size=2, deepspeed_stage=2).name == "checkpoint-2"
    other = tmp_path / "plain"
    _checkpoint(other, 2)
    with pytest.raises(RunDirError, match="saved without DeepSpeed"):
        checkpoints.prepare_resume(other, world_size=1, deepspeed_stage=3)
    ddp = tmp_path / "ddp"  # plain data parallel: the epoch's rest is found per process, so the count must match
    _checkpoint(ddp, 2, world_size=1)
    (ddp / "interrupted.json").write_text('{"resume": "peftkit train r.yaml --resume"}')
    with pytest.raises(RunDirError, match=r"saved by 1 process\(es\), but this run has 2.*--nproc 1\)"):
        checkpoints.prepare_resume(ddp, world_size=2, deepspeed_stage=None)
    assert (ddp / "interrupted.json").is_file()  # a refused resume keeps the record of how to resume


def test_marker_callback_keeps_a_complete_checkpoint_when_pruning_to_one(tmp_path):
    callback = checkpoints.CompleteMarkerCallback(keep=1)
    args = SimpleNamespace(output_dir=str(tmp_path / "checkpoints"), world_size=1)
    for step in (2, 4):
        folder = _checkpoint(tmp_path, step, complete=False)
        (folder / "trainer_state.json").write_text("{}")
        callback.on_save(args, SimpleNamespace(global_step=step, is_world_process_zero=True, best_model_checkpoint=None), None)
    assert [p.name for p in checkpoints.checkpoint_dirs(tmp_path)] == ["checkpoint-4"]
    assert checkpoints.read_marker(tmp_path / "checkpoints" / "checkpoint-4") == {"step": 4, "world_size": 1, "deepspeed_stage": None}


def test_resume_flag_semantics(tmp_path):
    run_dir = tmp_path / "run"
    assert resolve_resume(None, run_dir, force=False) == (False, False)
    assert resolve_resume("auto", run_dir, force=False) == (False, False)  # nothing yet: start fresh
    with pytest.raises(RunDirError, match="no run to resume"):
        resolve_resume("last", run_dir, force=False)  # bare --resume: a typo must not start a fresh run
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text("x")
    assert resolve_resume("auto", run_dir, force=False) == (False, True)  # killed before any checkpoint
    for strict in (str(run_dir), "last"):
        with pytest.raises(RunDirError, match="no complete checkpoint"):
            resolve_resume(strict, run_dir, force=False)
    _checkpoint(run_dir, 2)
    assert resolve_resume("auto", run_dir, force=False) == (True, False)
    assert resolve_resume(str(run_dir), run_dir, force=False) == (True, False)
    with pytest.raises(RunDirError, match="contradict"):
        resolve_resume("auto", run_dir, force=True)
    (run_dir / "summary.json").write_text("{}")
    with pytest.raises(RunDirError, match="finished run"):
        resolve_resume("auto", run_dir, force=False)


def test_worker_exit_is_reported_by_what_the_workers_left(tmp_path, caplog, monkeypatch):
    """The launcher's exit code alone does not decide: an interrupt checkpoint that is complete is resumable."""
    saved = _checkpoint(tmp_path, 3, world_size=2, deepspeed_stage=2)
    record = {"step": 3, "checkpoint": str(saved), "signal": "SIGINT"}
    with pytest.raises(TrainingInterrupted, match="interrupted at step 3") as clean:
        raise_for_worker_exit(0, 1, record, tmp_path)
    assert clean.value.checkpoint == saved and clean.value.exit_code == 130
    with pytest.raises(TrainingInterrupted) as terminated:
        raise_for_worker_exit(0, 1, {**record, "signal": "SIGTERM"}, tmp_path)
    assert terminated.value.exit_code == 143  # 128 + SIGTERM, as a shell reports a job stopped by it
    with caplog.at_level("WARNING"), pytest.raises(TrainingInterrupted):
        raise_for_worker_exit(1, 1, record, tmp_path)  # a worker aborted on the way out, after the save
    assert "exit code 1" in caplog.text and "checkpoint is complete" in caplog.text

    partial = _checkpoint(tmp_path, 5, complete=False)
    with pytest.raises(LaunchError, match="before a checkpoint could be saved"):
        raise_for_worker_exit(1, 1, {"step": 5, "checkpoint": str(partial)}, tmp_path)
    with pytest.raises(LaunchError, match=r"before a checkpoint could be saved.*--resume") as resumable:
        raise_for_worker_exit(-2, 1, None, tmp_path)  # checkpoint-3 of an earlier session is there
    assert resumable.value.exit_code == 130
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.setattr(sys, "argv", ["peftkit", "train", "r.yaml", "--nproc", "2", "--resume", "auto"])
    with pytest.raises(LaunchError) as no_checkpoint:
        raise_for_worker_exit(-2, 1, None, fresh)
    assert str(no_checkpoint.value).endswith("rerun with: peftkit train r.yaml --nproc 2 --force")
    with pytest.raises(LaunchError, match="failed in a worker process"):
        raise_for_worker_exit(1, 0, None, tmp_path)
    raise_for_worker_exit(0, 0, None, tmp_path)  # a normal end: nothing to say here


def test_resume_command_repeats_the_launch_with_resume():
    assert resume_command(["train", "r.yaml", "train.lr=1e-3", "--nproc", "2", "--force"]) == (
        "peftkit train r.yaml train.lr=1e-3 --nproc 2 --resume"
    )
    assert resume_command(["train", "r.yaml", "--resume", "runs/x"]) == "peftkit train r.yaml --resume runs/x"


def test_resuming_drops_later_records_and_the_interrupted_sessions_end_record(tmp_path):
    """A Ctrl-C'd session ends with a `train_runtime` / `train_loss` record at the checkpoint's own step; it described
    that session only, and the resumed run writes the run's own at its end."""
    import json

    from peftkit.train.checkpoints import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    records = [{"step": 5, "loss": 2.0}, {"step": 7, "eval_loss": 1.9}, {"step": 7, "train_runtime": 3.1, "train_loss": 2.2},
               {"step": 9, "loss": 1.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert truncate_metrics(path, 7) == 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:2]
    # killed during the final evaluation after training: it is run again, so its first record goes (it was kept twice)
    records = [{"step": 12, "eval_loss": 1.8}, {"step": 12, "train_runtime": 3.1, "train_loss": 2.2},
               {"step": 12, "eval_loss": 1.7}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert truncate_metrics(path, 12) == 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:1]


def test_resume_refuses_data_that_changed_since_the_run_started(tiny_model_dir, tmp_path):
    """The checkpoint continues the start's data order, and the eval loss before training was measured on its eval
    split: resuming on an edited data file would mix two runs without a word."""
    from tests.conftest import CHAT_RECORDS, write_jsonl

    path = tiny_recipe_file(tmp_path, tiny_model_dir, train={"max_steps": 4})
    run_dir = train(load_recipe(path)).run_dir
    first = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").unlink()  # as if killed after its last checkpoint
    train(load_recipe(path), resume=True)  # the same data: resumes
    ends = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train_runtime" in r]
    assert len(ends) == 1 and ends[0]["train_loss"] == pytest.approx(first["train_loss"], abs=1e-5)  # the run's
    (run_dir / "summary.json").unlink()
    write_jsonl(tmp_path / "train.jsonl", CHAT_RECORDS * 2)
    with pytest.raises(RunDirError, match="the training or eval data differ from those .* was started with"):
        train(load_recipe(path), resume=True)


def test_only_fingerprints_of_one_kind_tell_other_weights():
    from peftkit.models.fingerprint import other_weights

    assert other_weights("v2-0123456789abcdef", "v2-fedcba9876543210")
    assert not other_weights("v2-0123456789abcdef", "v2-0123456789abcdef")
    assert not other_weights("bin-0123456789abcdef", "v2-fedcba9876543210")  # a .bin base since saved as safetensors
    assert not other_weights(None, "v2-fedcba9876543210") and not other_weights("v2-0123456789abcdef", None)


def test_resume_refuses_a_base_model_replaced_since_the_run_started(tiny_model_dir, tmp_path):
    """The checkpoint's adapter was trained on the start's base weights: a base re-saved in place with other weights
    of the same shapes resumed without a word, and the report compared two models' eval losses."""
    import shutil

    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    path = tiny_recipe_file(tmp_path, base, train={"max_steps": 4})
    run_dir = train(load_recipe(path)).run_dir
    assert json.loads((run_dir / "before.json").read_text())["base_fingerprint"]
    (run_dir / "summary.json").unlink()  # as if killed after its last checkpoint
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
    model.save_pretrained(base)
    with pytest.raises(RunDirError, match="the base model .* is not the one .* was started on"):
        train(load_recipe(path), resume=True)


def test_a_resume_with_other_held_out_questions_asks_the_untrained_model_them_again(tiny_model_dir, tmp_path, caplog):
    """The before / after comparison is over one question set: resumed on an edited held-out file, the before side
    came from the start's questions (2) and the after side from the file's (3)."""
    from tests.conftest import write_jsonl

    questions = [{"question": "when does the library open?", "key_fact": "nine"},
                 {"question": "tell me the wifi password", "key_fact": ["river"]}]
    write_jsonl(tmp_path / "heldout.jsonl", questions)
    data = {"train": "train.jsonl", "heldout": "heldout.jsonl", "eval_fraction": 0.25, "max_seq_len": 64}
    path = tiny_recipe_file(tmp_path, tiny_model_dir, train={"max_steps": 4}, extra={"data": data})
    path.write_text(path.read_text().replace("before: false", "before: true"))
    run_dir = train(load_recipe(path)).run_dir
    assert len(json.loads((run_dir / "before.json").read_text())["heldout_details"]) == 2
    (run_dir / "summary.json").unlink()  # as if killed after its last checkpoint
    write_jsonl(tmp_path / "heldout.jsonl", [*questions, {"question": "who is the head librarian?", "key_fact": "Ada"}])
    with caplog.at_level("WARNING"):
        train(load_recipe(path), resume=True)
    assert "The held-out questions are not the ones" in caplog.text
    summary = json.loads((run_dir / "summary.json").read_text())
    before = json.loads((run_dir / "before.json").read_text())
    assert summary["heldout_questions"] == len(before["heldout_details"]) == 3
    assert summary["heldout_accuracy_before"] == before["heldout_accuracy"]
    assert len((run_dir / "heldout.jsonl").read_text().splitlines()) == 3


def test_a_resume_with_an_edited_earlier_turn_of_a_held_out_question_asks_it_again(tiny_model_dir, tmp_path, caplog):
    """The last question and its key fact are not the whole item: an edited earlier turn (or tool list) changes what
    the model is asked, so the before side must be measured again."""
    from tests.conftest import write_jsonl

    def item(earlier: str) -> dict:
        return {"messages": [{"role": "user", "content": earlier}, {"role": "assistant", "content": "Sure."},
                             {"role": "user", "content": "and the wifi password?"}], "key_fact": "river"}

    write_jsonl(tmp_path / "heldout.jsonl", [item("I am at the library.")])
    data = {"train": "train.jsonl", "heldout": "heldout.jsonl", "eval_fraction": 0.25, "max_seq_len": 64}
    path = tiny_recipe_file(tmp_path, tiny_model_dir, train={"max_steps": 2}, extra={"data": data})
    path.write_text(path.read_text().replace("before: false", "before: true"))
    run_dir = train(load_recipe(path)).run_dir
    started = json.loads((run_dir / "before.json").read_text()).get("heldout_fingerprint")
    (run_dir / "summary.json").unlink()  # as if killed after its last checkpoint
    write_jsonl(tmp_path / "heldout.jsonl", [item("I am at the town hall.")])
    with caplog.at_level("WARNING"):
        train(load_recipe(path), resume=True)
    assert "The held-out questions are not the ones" in caplog.text
    assert json.loads((run_dir / "before.json").read_text()).get("heldout_fingerprint") not in (None, started)


def test_a_resume_with_another_process_count_is_refused_before_anything_loads(tiny_model_dir, tmp_path, monkeypatch):
    """The one-process run and the launcher check the checkpoint's setup first (it was found after the model loaded,
    and under --nproc by every worker, each with torchrun's traceback)."""
    import argparse

    from peftkit.train import launch, run as run_module
    from peftkit.train.launch import LaunchOptions

    path = tiny_recipe_file(tmp_path, tiny_model_dir, train={"max_steps": 2})
    run_dir = train(load_recipe(path)).run_dir
    (run_dir / "summary.json").unlink()
    marker = checkpoints.checkpoint_dirs(run_dir)[-1] / checkpoints.MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "world_size": 2}))

    def loaded(*args, **kwargs):
        raise AssertionError("the tokenizer / workers were reached")

    monkeypatch.setattr(run_module, "load_tokenizer", loaded)
    with pytest.raises(RunDirError, match=r"saved by 2 process\(es\), but this run has 1"):
        train(load_recipe(path), resume=True)
    monkeypatch.setattr(launch, "run_supervised", loaded)
    args = argparse.Namespace(resume="last", force=False)
    with pytest.raises(RunDirError, match=r"saved by 2 process\(es\), but this run has 3"):
        launch._launch(args, load_recipe(path), str(path), LaunchOptions(nproc=3), None, run_dir)


def test_a_checkpoint_the_full_disk_cut_short_is_removed_and_named(tiny_recipe, monkeypatch, caplog):
    """The half-written checkpoint stayed on the full disk: --resume could not even start, and the message left the
    user to guess which checkpoint folder was safe to delete (the older one is the only one to resume from)."""
    from transformers import Trainer

    from peftkit.config import recipe_from_dict

    saves = []
    original = Trainer._save_optimizer_and_scheduler

    def fills_the_disk(self, output_dir):
        saves.append(output_dir)
        if len(saves) == 2:
            (Path(output_dir) / "optimizer.pt").write_bytes(b"\0" * 1000)  # part-way
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 43200 vs 43092")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", fills_the_disk)
    recipe = recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 3, "save_steps": 1},
                               "eval": {"before": False}})
    with caplog.at_level("WARNING", logger="peftkit"), pytest.raises(RuntimeError, match="unexpected pos"):
        train(recipe)
    run_dir = Path(tiny_recipe["output_dir"])
    kept = checkpoints.checkpoint_dirs(run_dir)
    assert [p.name for p in kept] == ["checkpoint-1"] and checkpoints.is_complete(kept[0])
    assert f"Removed {run_dir / 'checkpoints' / 'checkpoint-2'}: the full disk cut its save short" in caplog.text
    umask = os.umask(0)
    os.umask(umask)
    if umask & 0o044 == 0:  # safetensors writes 0600: readable by others as the rest is
        assert (kept[0] / "adapter_model.safetensors").stat().st_mode & 0o044 == 0o044
