"""The run directory: --force deletes only peftkit's own runs and only once the new run's data and model are usable; a
resumed run keeps its recipe; a failed start blocks nothing; early stopping is reported with max_steps."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from peftkit.config import recipe_from_dict
from peftkit.errors import DataError, ModelNotFoundError, RunDirError
from peftkit.train import checkpoints
from peftkit.train.run import train
from peftkit.train.run_dir import RUN_MARKER, check_run_dir, recipe_changes, run_lock


def _too_long_chat(folder: Path) -> Path:
    """Valid conversations whose prompt alone fills max_seq_len=64: they pass `validate`, then leave nothing to train."""
    path = folder / "long.jsonl"
    prompt = " ".join(["word"] * 200)
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": prompt},
                                                     {"role": "assistant", "content": "ok"}]}) + "\n" for _ in range(8)))
    return path


def _short(tiny_recipe: dict, **train_settings) -> dict:
    return {**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 2, **train_settings}, "eval": {"before": False}}


def test_force_never_deletes_a_folder_peftkit_did_not_make(tiny_recipe, tmp_path):
    precious = tmp_path / "my-project"
    precious.mkdir()
    (precious / "notes.txt").write_text("years of work")
    (precious / "recipe.yaml").write_text("a recipe of mine")  # a recipe alone does not make it a run
    recipe = recipe_from_dict({**_short(tiny_recipe), "output_dir": str(precious)})
    with pytest.raises(RunDirError, match="did not create") as caught:
        train(recipe, force=True)
    assert "--force" in str(caught.value)
    assert (precious / "notes.txt").read_text() == "years of work"
    assert (precious / "recipe.yaml").read_text() == "a recipe of mine"


def test_a_force_killed_while_clearing_the_run_leaves_no_checkpoint_marked_complete(tiny_recipe, monkeypatch):
    """`train --force` removed the old checkpoints file by file in directory order: killed half-way, a folder could
    keep its completion marker without its weights or optimizer, which --resume then trusted."""
    from peftkit.train import run_dir as run_dirs

    first = train(recipe_from_dict(_short(tiny_recipe))).run_dir
    assert any(checkpoints.is_complete(p) for p in checkpoints.checkpoint_dirs(first))

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt  # stands for the kill, at the first folder removed

    monkeypatch.setattr(run_dirs.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        run_dirs.clear_run_dir(first)
    assert checkpoints.checkpoint_dirs(first)
    assert not any(checkpoints.is_complete(p) for p in checkpoints.checkpoint_dirs(first))


def test_failing_force_keeps_the_earlier_run(tiny_recipe, tmp_path):
    first = train(recipe_from_dict(_short(tiny_recipe))).run_dir
    assert (first / RUN_MARKER).is_file()
    adapter = (first / "adapter" / "adapter_model.safetensors").read_bytes()
    summary = (first / "summary.json").read_text()
    recipe = recipe_from_dict({**_short(tiny_recipe), "data": {**tiny_recipe["data"], "train": str(_too_long_chat(tmp_path))}})
    with pytest.raises(DataError, match="max_seq_len"):
        train(recipe, force=True)
    assert (first / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert (first / "summary.json").read_text() == summary
    # Nor does a model that cannot load (a damaged copy of the base: validate reads only its config).
    damaged = tmp_path / "damaged-base"
    shutil.copytree(tiny_recipe["model"]["name"], damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelNotFoundError, match="a weights file is damaged .* download or copy the model again"):
        train(recipe_from_dict({**_short(tiny_recipe), "model": {"name": str(damaged)}}), force=True)
    assert (first / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert (first / "summary.json").read_text() == summary


def test_a_start_that_failed_on_its_data_blocks_nothing(tiny_recipe, tmp_path):
    long_chat = _too_long_chat(tmp_path)
    recipe = _short(tiny_recipe)
    with pytest.raises(DataError, match=r"data.max_seq_len=64"):
        train(recipe_from_dict({**recipe, "data": {**recipe["data"], "train": str(long_chat)}}))
    run_dir = Path(recipe["output_dir"])
    assert not run_dir.exists() or not any(p for p in run_dir.iterdir() if not p.name.startswith("."))
    summary = train(recipe_from_dict(recipe)).summary  # the fixed data trains in the same output_dir, no --force
    assert summary["steps"] == 2


def test_a_run_that_failed_before_training_is_replaced_without_force(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RUN_MARKER).write_text("")
    (run_dir / "recipe.yaml").write_text("x")
    assert check_run_dir(run_dir, resume=False, force=False, recipe_dump={}) is True
    (run_dir / "metrics.jsonl").write_text("{}\n")  # training had begun: that needs --resume or --force
    with pytest.raises(RunDirError, match="unfinished run that saved no checkpoint; pass --force to start over"):
        check_run_dir(run_dir, resume=False, force=False, recipe_dump={})
    from peftkit.runs import adapter_dir  # chat / eval / merge / export: no advice that cannot work (--resume)

    with pytest.raises(RunDirError, match="saved no checkpoint to resume from, so train it again with .* --force"):
        adapter_dir(run_dir)
    checkpoint = run_dir / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / checkpoints.MARKER).write_text("{}")
    (checkpoint / "trainer_state.json").write_text("{}")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(checkpoint / "adapter_model.safetensors"))
    # without its optimizer, schedule and random state it cannot be resumed: no advice says --resume, and not even
    # `--resume auto` starts over on its own (that deletes the checkpoints)
    damaged = r"every checkpoint it saved is damaged \(checkpoint-2: optimizer.pt, scheduler.pt, rng_state.pth are missing\)"
    with pytest.raises(RunDirError, match=damaged + "; pass --force to start over"):
        check_run_dir(run_dir, resume=False, force=False, recipe_dump={})
    with pytest.raises(RunDirError, match=damaged + ", so train it again with .* --force"):
        adapter_dir(run_dir)
    from peftkit.train.launch import resolve_resume

    for flag in ("auto", "yes"):
        with pytest.raises(RunDirError, match="cannot be resumed: " + damaged + "; start it again with --force"):
            resolve_resume(flag, run_dir, force=False)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({}, checkpoint / name)
    with pytest.raises(RunDirError, match="pass --resume to continue it or --force"):
        check_run_dir(run_dir, resume=False, force=False, recipe_dump={})
    with pytest.raises(RunDirError, match=f"resume it with `peftkit train {run_dir} --resume`"):
        adapter_dir(run_dir)
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match="is a file"):
        check_run_dir(tmp_path / "file", resume=False, force=True, recipe_dump={})


def test_resume_refuses_a_changed_recipe_and_keeps_the_stored_one(tiny_recipe):
    recipe = _short(tiny_recipe, save_steps=1)
    run_dir = train(recipe_from_dict(recipe)).run_dir
    (run_dir / "summary.json").unlink()  # as if killed after its last checkpoint
    stored = (run_dir / "recipe.yaml").read_text()
    changed = {**recipe, "train": {**recipe["train"], "lr": 0.1}}
    with pytest.raises(RunDirError, match=r"train\.lr: 0\.005 -> 0\.1"):
        train(recipe_from_dict(changed), resume=True)
    assert (run_dir / "recipe.yaml").read_text() == stored
    # Settings that do not touch the training state may change on resume.
    harmless = recipe_from_dict({**recipe, "eval": {"before": False, "max_new_tokens": 4}, "description": "again"})
    assert recipe_changes(run_dir, harmless.model_dump(mode="json")) == []
    # `peftkit train RUN_DIR --resume` names the run by its absolute path; the recipe said `runs/x`.
    moved = recipe_from_dict({**recipe, "output_dir": "runs/somewhere-relative"})
    assert recipe_changes(run_dir, moved.model_dump(mode="json")) == []
    # A run written before train.hashed_dropout existed (its recipe.yaml lacks the key) still resumes.
    yaml_text = (run_dir / "recipe.yaml").read_text()
    assert "hashed_dropout: true" in yaml_text
    (run_dir / "recipe.yaml").write_text(yaml_text.replace("hashed_dropout: true", ""))
    torch_dropout = recipe_from_dict({**recipe, "train": {**recipe["train"], "hashed_dropout": False}})
    assert recipe_changes(run_dir, torch_dropout.model_dump(mode="json")) == []


def test_resume_auto_on_a_finished_run_does_nothing_and_succeeds(tiny_recipe, tmp_path, capsys):
    from peftkit.cli import main

    recipe = _short(tiny_recipe)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    summary = (Path(recipe["output_dir"]) / "summary.json").read_text()
    capsys.readouterr()
    assert main(["train", str(path), "--resume", "auto"]) == 0  # a scheduled job started again after the end
    assert "nothing to resume" in " ".join(capsys.readouterr().out.split())
    assert (Path(recipe["output_dir"]) / "summary.json").read_text() == summary
    # the same job after its recipe was edited: that recipe was never trained, which is not success
    assert main(["train", str(path), "train.lr=1e-3", "adapter.r=8", "--resume", "auto"]) != 0
    err = " ".join(capsys.readouterr().err.split())
    assert "finished run made from another recipe" in err and "adapter.r: 4 -> 8" in err and "--force" in err
    assert (Path(recipe["output_dir"]) / "summary.json").read_text() == summary


def test_resumed_summary_covers_the_whole_run(tiny_recipe, tmp_path):
    whole = train(recipe_from_dict({**tiny_recipe, "output_dir": str(tmp_path / "whole"), "train": {
        **tiny_recipe["train"], "max_steps": 4, "save_steps": 2}})).summary
    recipe = recipe_from_dict({**tiny_recipe, "output_dir": str(tmp_path / "cut"), "train": {
        **tiny_recipe["train"], "max_steps": 4, "save_steps": 2}})
    run_dir = train(recipe).run_dir
    for name in ("summary.json", "adapter", "checkpoints/checkpoint-4"):  # as if killed after step 2's checkpoint
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    progress = checkpoints.read_progress(run_dir / "checkpoints" / "checkpoint-2")
    assert progress is not None and progress.steps == 2 and progress.supervised_tokens > 0
    resumed = train(recipe, resume=True).summary
    assert resumed["trained_tokens"] == whole["trained_tokens"]
    assert resumed["input_tokens"] == whole["input_tokens"]
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-4)
    assert resumed["eval_loss_before"] == pytest.approx(whole["eval_loss_before"], rel=1e-5)
    assert resumed["heldout_accuracy_before"] == whole["heldout_accuracy_before"] is not None
    assert resumed["train_seconds"] > progress.train_seconds
    # the cut session's evaluations stay counted (the summary keeps 0.01 s)
    assert resumed["eval_seconds_in_training"] >= progress.eval_seconds - 0.005
    # The logs agree with the summary: the end record is the run's, and TensorBoard hides the cut session's steps.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    end = [r for r in records if "train_runtime" in r]
    assert len(end) == 1 and end[0]["train_loss"] == pytest.approx(resumed["train_loss"], rel=1e-6)
    assert end[0]["train_runtime"] == pytest.approx(resumed["train_seconds"], abs=0.5)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("train/train_loss")] == [pytest.approx(resumed["train_loss"], rel=1e-6)]
    assert resumed["wall_seconds"] > progress.wall_seconds > 0 and resumed["wall_seconds"] >= resumed["train_seconds"]


def test_early_stopping_is_reported_with_max_steps(tiny_recipe):
    recipe = recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 60, "lr": 0.5,
                                                        "eval_steps": 1, "early_stopping_patience": 1},
                               "eval": {"before": False}})
    result = train(recipe)
    assert result.summary["stopped_early"] is True and result.summary["steps"] < 60
    from rich.console import Console

    from peftkit.train.report import print_run_report

    console = Console(record=True, width=300)
    print_run_report(console, result.run_dir, result.summary)
    assert "stopped early: the eval loss stopped improving" in console.export_text()
    # The final evaluation lands in RUN_DIR/tensorboard, not in a stray checkpoints/runs folder.
    assert not (result.run_dir / "checkpoints" / "runs").exists()


def test_data_paths_expand_the_home_folder(tiny_recipe, tmp_path, monkeypatch):
    from peftkit.config import load_recipe

    home = tmp_path / "home"
    (home / "d").mkdir(parents=True)
    (home / "d" / "chat.jsonl").write_text(Path(tiny_recipe["data"]["train"]).read_text())
    monkeypatch.setenv("HOME", str(home))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**tiny_recipe, "data": {**tiny_recipe["data"], "train": "~/d/chat.jsonl"}}))
    assert load_recipe(path).data.train == str(home / "d" / "chat.jsonl")


def test_an_eval_fraction_that_leaves_nothing_to_train_on_says_so(tiny_recipe):
    recipe = recipe_from_dict({**tiny_recipe, "data": {**tiny_recipe["data"], "eval_fraction": 0.99}})
    with pytest.raises(DataError, match="eval_fraction=0.99 of .* leaves none to train on"):
        train(recipe)


def test_the_launcher_leaves_the_replacement_to_the_workers(tiny_recipe, monkeypatch):
    """`--nproc N --force` checks the folder before starting workers but deletes nothing itself: rank 0 replaces the
    earlier run once the new data is read, so workers that fail on their data lose nothing."""
    import argparse

    from peftkit.train import launch as launcher

    first = train(recipe_from_dict(_short(tiny_recipe))).run_dir
    summary = (first / "summary.json").read_text()
    started: list[list[str]] = []
    monkeypatch.setattr(launcher, "run_supervised", lambda cmd, env, **kw: (started.append(cmd), (1, 0))[1])
    args = argparse.Namespace(resume=None, force=True, overrides=[], deepspeed=None, verbose=False)
    with pytest.raises(launcher.LaunchError):
        launcher.launch(args, recipe_from_dict(_short(tiny_recipe)), "recipe.yaml",
                        launcher.LaunchOptions(nproc=2), console=None)
    assert started and "--force" in started[0]
    assert (first / "summary.json").read_text() == summary


def test_a_classification_force_that_fails_on_its_data_keeps_the_earlier_run(tiny_recipe, monkeypatch):
    from tests.unit.test_classification import _recipe

    import peftkit.train.classification as classification

    run_dir = Path(tiny_recipe["output_dir"])
    recipe = recipe_from_dict(_recipe(Path(tiny_recipe["model"]["name"]), run_dir.parent, {"method": "lora", "r": 4},
                                      max_steps=2))
    train(recipe)
    summary = (run_dir / "summary.json").read_text()

    def failing_data(*args, **kwargs):
        raise DataError("the new data is broken")

    monkeypatch.setattr(classification, "build_classification_data", failing_data)
    with pytest.raises(DataError, match="broken"):
        train(recipe, force=True)
    assert (run_dir / "summary.json").read_text() == summary


def test_one_process_at_a_time_trains_into_a_run_directory(tiny_recipe, tmp_path, capsys):
    from peftkit.train.run_dir import LOCK_FILE, run_lock, training_in

    run_dir = Path(tiny_recipe["output_dir"])
    with run_lock(run_dir):
        assert training_in(run_dir).startswith(f"pid {os.getpid()}")
        with pytest.raises(RunDirError, match=f"in use: peftkit is training into it \\(pid {os.getpid()}"):
            train(recipe_from_dict(_short(tiny_recipe)), force=True)  # a second run would delete the first's files
        from peftkit.cli import main

        recipe_file = tmp_path / "recipe.yaml"
        recipe_file.write_text(yaml.safe_dump(_short(tiny_recipe)))
        assert main(["train", str(recipe_file), "--resume"]) == 2  # not "no complete checkpoint": it is being written
        assert "is in use: peftkit is training into it" in capsys.readouterr().err
    assert training_in(run_dir) is None and not (run_dir / LOCK_FILE).exists()
    assert not run_dir.exists()  # the lock made the folder; nothing else was written, so nothing is left
    result = train(recipe_from_dict(_short(tiny_recipe)))
    assert result.summary["steps"] == 2 and not (run_dir / LOCK_FILE).exists()


def test_train_waits_for_a_merge_reading_the_run_and_a_merge_for_a_training(tiny_recipe, tmp_path, capsys):
    from peftkit.cli import main
    from peftkit.train.run_dir import LOCK_FILE, reading_runs, run_lock

    run_dir = Path(tiny_recipe["output_dir"])
    train(recipe_from_dict(_short(tiny_recipe)))
    with reading_runs(run_dir, run_dir):  # two readers (as `merge --adapters A A`) share it
        with pytest.raises(RunDirError, match="another peftkit command \\(merge, export or eval\\) is reading it"):
            train(recipe_from_dict(_short(tiny_recipe)), force=True)  # would delete the adapter being merged
        assert (run_dir / "adapter" / "adapter_config.json").is_file()
    with run_lock(run_dir):
        assert main(["merge", str(run_dir), "--out", str(tmp_path / "merged"), "--no-verify"]) == 2
        assert f"{run_dir} is still training (pid {os.getpid()}" in capsys.readouterr().err
        assert not (tmp_path / "merged").exists()
    assert main(["export", str(run_dir), "--format", "adapter", "--out", str(tmp_path / "a"), "--no-verify"]) == 0
    assert (run_dir / LOCK_FILE).is_file()  # hidden and empty: nothing to resume or delete, and not a user's file
    train(recipe_from_dict(_short(tiny_recipe)), force=True)  # no reader left: the next run goes ahead


def test_a_run_folder_the_lock_cannot_be_made_in_is_read_without_one(tmp_path):
    from peftkit.train.run_dir import reading_runs

    not_a_folder = tmp_path / "run.tar"
    not_a_folder.write_text("x")
    with reading_runs(not_a_folder, tmp_path / "missing"):  # the export itself then says what is wrong
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.tar"]


def test_the_lock_goes_with_a_killed_process(tmp_path):
    import subprocess
    import sys

    from peftkit.train.run_dir import run_lock, training_in

    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from peftkit.train.run_dir import run_lock\n"
        f"with run_lock(Path({str(run_dir)!r})):\n    print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert training_in(run_dir) == f"pid {holder.pid}" or training_in(run_dir).startswith(f"pid {holder.pid},")
    finally:
        holder.kill()
        holder.wait()
    assert training_in(run_dir) is None  # kill -9 released it; the stale file does not block
    with run_lock(run_dir):
        pass


def test_a_run_killed_after_its_last_checkpoint_resumes_without_an_extra_step(tiny_recipe):
    """Killed during the final evaluation or saving: the checkpoint of the last step exists, and transformers
    would train one step past max_steps on resume."""
    recipe = recipe_from_dict(_short(tiny_recipe, max_steps=4, save_steps=2))
    whole = train(recipe)
    adapter = (whole.run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    for name in ("summary.json", "README.md", "adapter"):
        path = whole.run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = train(recipe, resume=True)
    assert resumed.summary["steps"] == 4 and resumed.summary["trained_tokens"] == whole.summary["trained_tokens"]
    assert resumed.summary["train_loss"] == pytest.approx(whole.summary["train_loss"], rel=1e-6)
    assert (resumed.run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert [p.name for p in checkpoints.checkpoint_dirs(resumed.run_dir)][-1] == "checkpoint-4"


def test_an_early_stopping_run_killed_after_its_last_checkpoint_still_ships_the_best_weights(tiny_recipe):
    """Resumed at its last step, the run is not trained again; it must still load the best evaluation's weights
    (what load_best_model_at_end does at the end of training), as its summary and card say."""
    recipe = recipe_from_dict(_short(tiny_recipe, max_steps=6, save_steps=1, eval_steps=1, lr=0.5,
                                     early_stopping_patience=10, save_total_limit=10))
    whole = train(recipe)
    best = whole.summary["weights_from_step"]
    assert best < 6, "the high lr makes the eval loss rise after an early best step"
    adapter = (whole.run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    for name in ("summary.json", "README.md", "adapter"):
        path = whole.run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = train(recipe, resume=True)
    assert resumed.summary["weights_from_step"] == best
    assert (resumed.run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert resumed.summary["overfitting_warning"] == whole.summary["overfitting_warning"]


def test_a_project_folder_with_a_recipe_and_checkpoints_is_never_cleared(tiny_recipe, tmp_path):
    """A recipe.yaml next to a checkpoints/ folder (or a summary.json) of the user's own is no older peftkit run:
    neither a plain start nor --force deletes anything in it."""
    project = tmp_path / "myproj"
    (project / "checkpoints" / "my-other-model").mkdir(parents=True)
    (project / "checkpoints" / "my-other-model" / "weights.bin").write_text("w")
    (project / "src").mkdir()
    (project / "src" / "code.py").write_text("print('hi')")
    shutil.copy(tiny_recipe["data"]["train"], project / "train.jsonl")
    (project / "recipe.yaml").write_text("my recipe")
    recipe = recipe_from_dict({**_short(tiny_recipe), "output_dir": str(project)})
    for force in (False, True):
        with pytest.raises(RunDirError, match="did not create|not a run.s own"):
            train(recipe, force=force)
    assert (project / "src" / "code.py").read_text() == "print('hi')"
    assert (project / "checkpoints" / "my-other-model" / "weights.bin").read_text() == "w"
    assert (project / "recipe.yaml").read_text() == "my recipe" and (project / "train.jsonl").is_file()
    # Its foreign checkpoints/ entry alone keeps it from being replaced.
    (project / "src" / "code.py").unlink()
    (project / "src").rmdir()
    (project / "train.jsonl").unlink()
    with pytest.raises(RunDirError, match="did not create|not a run.s own"):
        check_run_dir(project, resume=False, force=False, recipe_dump={})
    # A summary.json does not make one either.
    notes = tmp_path / "notes-folder"
    notes.mkdir()
    for name, text in (("recipe.yaml", "r"), ("summary.json", "{}"), ("notes.txt", "mine")):
        (notes / name).write_text(text)
    with pytest.raises(RunDirError, match="did not create|not a run.s own"):
        check_run_dir(notes, resume=False, force=True, recipe_dump={})
    assert (notes / "notes.txt").read_text() == "mine"


def test_force_replaces_a_run_but_never_files_put_beside_it(tmp_path):
    from peftkit.train.run_dir import clear_run_dir

    old = tmp_path / "old-run"  # written before the marker existed: a run's files only
    (old / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    for name in ("recipe.yaml", "summary.json", "metrics.jsonl"):
        (old / name).write_text("x")
    assert check_run_dir(old, resume=False, force=True, recipe_dump={}) is True
    clear_run_dir(old)
    assert list(old.iterdir()) == []
    marked = tmp_path / "marked"
    (marked / "adapter").mkdir(parents=True)
    (marked / RUN_MARKER).write_text("")
    (marked / "summary.json").write_text("{}")
    (marked / "my-notes.txt").write_text("mine")
    for force in (False, True):  # --force, or a start that failed before training: refused before loading anything
        if not force:
            (marked / "summary.json").unlink()
        with pytest.raises(RunDirError, match=r"files that are not a run's own \(my-notes.txt\).*move them out"):
            check_run_dir(marked, resume=False, force=force, recipe_dump={})
    with pytest.raises(RunDirError, match="my-notes.txt"):
        clear_run_dir(marked)
    assert sorted(p.name for p in marked.iterdir()) == [RUN_MARKER, "adapter", "my-notes.txt"]



def test_force_keeps_files_put_into_a_runs_own_folders(tiny_recipe, tmp_path):
    """`train --force` deleted a user's files inside plots/, tensorboard/, adapter/ and tokenizer/ with the run:
    only the top folder, the exports and checkpoints/ were looked into."""
    from peftkit.train.run_dir import foreign_entries

    recipe = recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 1}})
    run_dir = train(recipe).run_dir
    assert foreign_entries(run_dir) == []  # all a run writes is its own
    for name in ("plots", "tensorboard", "adapter", "tokenizer"):
        mine = run_dir / name / "my-notes.txt"
        mine.write_text("mine")
        with pytest.raises(RunDirError, match=rf"files that are not a run's own \({name}/my-notes.txt\)"):
            train(recipe, force=True)
        assert mine.read_text() == "mine"
        mine.unlink()
    (run_dir / "plots" / ".my-hidden-notes").write_text("mine")  # hidden, but not a half-written leftover
    with pytest.raises(RunDirError, match=r"plots/.my-hidden-notes"):
        train(recipe, force=True)
    (run_dir / "plots" / ".my-hidden-notes").unlink()
    (run_dir / ".peftkit-files").unlink()  # a run from before the listing: its folders hold what peft saves
    assert foreign_entries(run_dir) == []
    (run_dir / "tokenizer" / "my_template_edit.jinja").write_text("mine")
    assert foreign_entries(run_dir) == ["tokenizer/my_template_edit.jinja"]
    (run_dir / "tokenizer" / "my_template_edit.jinja").unlink()
    train(recipe, force=True)  # nothing of the user's: replaced
    assert foreign_entries(run_dir) == []


def test_a_file_added_to_a_runs_export_folder_blocks_force_and_extra_entries_do_not_block_resume(tmp_path):
    """docs/export.md suggests running llama-quantize next to the GGUF export: RUN/gguf then holds the user's file,
    which `train --force` must not delete with the run. Resuming deletes nothing, so an older run holding an extra
    entry (an export written to another --out inside it) still resumes."""
    from peftkit.train.run_dir import foreign_entries, is_peftkit_run
    from peftkit.utils.atomic import MARKER_HEADER

    run = tmp_path / "run"
    (run / "gguf").mkdir(parents=True)
    (run / RUN_MARKER).write_text("")
    (run / "recipe.yaml").write_text("r")
    (run / "summary.json").write_text("{}")
    (run / "gguf" / ".peftkit-export").write_text(MARKER_HEADER + "Modelfile\nrun-f16.gguf\n")
    (run / "gguf" / "Modelfile").write_text("FROM ./run-f16.gguf\n")
    (run / "gguf" / "run-f16.gguf").write_text("")
    assert foreign_entries(run) == []
    (run / "gguf" / "run-Q4_K_M.gguf").write_text("user's")
    assert foreign_entries(run) == ["gguf/run-Q4_K_M.gguf"]  # the file named, not only its folder
    with pytest.raises(RunDirError, match=r"files that are not a run's own \(gguf/run-Q4_K_M.gguf\)"):
        check_run_dir(run, resume=False, force=True, recipe_dump={})
    assert (run / "gguf" / "run-Q4_K_M.gguf").read_text() == "user's"
    (run / "gguf" / ".peftkit-export").write_text("")  # an export from before the marker listed its files
    (run / "gguf" / "notes.txt").write_text("mine")
    assert foreign_entries(run) == ["gguf/notes.txt", "gguf/run-Q4_K_M.gguf"]  # names no export writes, as `export --out` says

    older = tmp_path / "older"  # no marker: written before it existed
    (older / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (older / "recipe.yaml").write_text("r")
    (older / "merged-bf16").mkdir()
    assert is_peftkit_run(older) and foreign_entries(older) == ["merged-bf16"]


def test_unit_tests_keep_model_caches_out_of_the_users_home():
    """tests/unit/conftest.py: GGUF bases the tests convert go under a temporary PEFTKIT_HOME."""
    import tempfile

    from peftkit.models.registry import peftkit_home

    home = peftkit_home().resolve()
    assert home.is_relative_to(Path(tempfile.gettempdir()).resolve()) and "peftkit-home" in str(home)
    assert not home.is_relative_to(Path(os.path.expanduser("~")).resolve() / ".cache")


def test_a_refused_start_leaves_no_parent_folders_it_made(tiny_recipe, tmp_path):
    """`output_dir: new/sub/run` with a recipe refused before anything is written: `new/` and `new/sub/` went too."""
    from peftkit.errors import PeftkitError

    run_dir = tmp_path / "new" / "sub" / "run"
    with pytest.raises(PeftkitError):
        with run_lock(run_dir):
            assert run_dir.is_dir()
            raise PeftkitError("refused")
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept" / "other").mkdir(parents=True)  # a parent holding something else stays
    with pytest.raises(PeftkitError), run_lock(tmp_path / "kept" / "run"):
        raise PeftkitError("refused")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["other"]


def test_an_unfinished_run_of_another_recipe_is_not_offered_resume(tiny_recipe):
    """--resume refuses a changed recipe, so the refusal to overwrite no longer sends the user there."""
    run_dir = train(recipe_from_dict(_short(tiny_recipe))).run_dir
    (run_dir / "summary.json").unlink()  # as if killed after its last checkpoint
    with pytest.raises(RunDirError, match="holds an unfinished run; pass --resume to continue it"):
        train(recipe_from_dict(_short(tiny_recipe)))
    changed = {**_short(tiny_recipe), "train": {**_short(tiny_recipe)["train"], "lr": 0.5}}
    with pytest.raises(RunDirError, match=r"holds an unfinished run of another recipe \(train\.lr: .* -> 0\.5\): set "
                                          r"another output_dir for this one, or pass --force"):
        train(recipe_from_dict(changed))
