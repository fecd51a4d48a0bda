"""Resume and interrupt cases from testers' reports: a moved run, early stopping, damaged checkpoints, signals after
training, the resume command of a launched run, the progress bar, threads and the metrics clock."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from peftkit.config import load_recipe
from peftkit.errors import RunDirError
from peftkit.train import checkpoints, run as run_module
from peftkit.train.callbacks import MetricsJsonlCallback, ProgressBar
from peftkit.train.run import train
from peftkit.train.signals import INTERRUPTED_FILE, TrainingInterrupted, read_interrupted
from tests.train_procs import adapter_tensors, tiny_recipe_file
from tests.unit.test_classification import _recipe as classification_recipe, tiny_bert_dir  # noqa: F401 (a fixture)

# lr 0.05 on the tiny model: eval loss falls until step 4, then rises (best checkpoint before the last one)
EARLY = {"lr": 0.05, "eval_steps": 2, "save_total_limit": 20}


class Killed(BaseException):
    """Stands for a kill -9 while the run evaluates its final weights."""


def _killed_after_training(monkeypatch: pytest.MonkeyPatch, recipe_file: Path) -> Path:
    def kill(*args, **kwargs):
        raise Killed()

    with monkeypatch.context() as patch:
        patch.setattr(run_module, "final_eval_loss", kill)
        with pytest.raises(Killed):
            train(load_recipe(recipe_file))
    run_dir = recipe_file.parent / "run"
    assert not (run_dir / "summary.json").exists()
    return run_dir


def _steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_moved_run_resumed_after_its_last_checkpoint_ships_the_best_weights(tiny_model_dir, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    recipe_file = tiny_recipe_file(tmp_path / "a", tiny_model_dir, train={**EARLY, "max_steps": 8, "early_stopping_patience": 10})
    run_dir = _killed_after_training(monkeypatch, recipe_file)
    last = checkpoints.latest_complete(run_dir)
    best = Path(json.loads((last / "trainer_state.json").read_text())["best_model_checkpoint"])
    assert checkpoints.step_of(last) == 8 and checkpoints.step_of(best) < 8, "the setup needs a best step before the last"
    moved = tmp_path / "moved"
    shutil.move(str(run_dir), moved)  # resumed as `peftkit train RUN_DIR --resume` resumes it
    summary = train(load_recipe(moved / "recipe.yaml", [f"output_dir={moved}"]), resume=True).summary
    assert summary["weights_from_step"] == checkpoints.step_of(best)
    shipped = adapter_tensors(moved / "adapter")
    want = adapter_tensors(moved / "checkpoints" / best.name)
    for key, value in want.items():
        torch.testing.assert_close(shipped[key], value)


def test_a_resumed_run_whose_best_checkpoint_is_gone_says_so(tiny_model_dir, tmp_path, monkeypatch, caplog):
    torch.set_num_threads(1)
    recipe_file = tiny_recipe_file(tmp_path, tiny_model_dir, train={**EARLY, "max_steps": 8, "early_stopping_patience": 10})
    run_dir = _killed_after_training(monkeypatch, recipe_file)
    best = Path(json.loads((run_dir / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())["best_model_checkpoint"])
    shutil.rmtree(best)
    with caplog.at_level(logging.WARNING):
        summary = train(load_recipe(recipe_file), resume=True).summary
    assert f"The best checkpoint {best.name} is gone" in caplog.text
    assert summary["weights_from_step"] == 8  # what it shipped, not the best step's name


def test_an_epoch_run_that_had_stopped_early_does_not_train_on_when_resumed(tiny_model_dir, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    recipe_file = tiny_recipe_file(tmp_path, tiny_model_dir,
                                   train={**EARLY, "max_steps": None, "epochs": 6, "early_stopping_patience": 1})
    run_dir = _killed_after_training(monkeypatch, recipe_file)
    last = checkpoints.latest_complete(run_dir)
    stopped_at = checkpoints.step_of(last)
    summary = train(load_recipe(recipe_file), resume=True).summary
    assert summary["steps"] == stopped_at and summary["stopped_early"]
    assert max(_steps_logged(run_dir)) == stopped_at
    assert checkpoints.stopped_early(last, 1) and not checkpoints.stopped_early(last, 2)


def test_resumed_runs_restore_the_early_stopping_counter(tiny_recipe, tmp_path):
    from peftkit.config.load import recipe_from_dict

    recipe = recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "early_stopping_patience": 2}})
    args = run_module.training_arguments(recipe, tmp_path, "cpu", torch.float32, has_eval=True)
    assert args.restore_callback_states_from_checkpoint


def _fake_checkpoint(run_dir: Path, step: int) -> Path:
    folder = run_dir / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({"state": step}, folder / name)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(64)}, str(folder / "adapter_model.safetensors"))
    (folder / "trainer_state.json").write_text("{}")
    (folder / checkpoints.MARKER).write_text(json.dumps({"step": step, "world_size": 1, "deepspeed_stage": None}))
    return folder


def test_a_damaged_checkpoint_is_passed_over_for_the_one_before(tmp_path, caplog):
    older, newer = _fake_checkpoint(tmp_path, 2), _fake_checkpoint(tmp_path, 4)
    os.truncate(newer / "optimizer.pt", 100)  # `truncate -s 100`
    with caplog.at_level(logging.WARNING):
        assert checkpoints.prepare_resume(tmp_path) == older
    assert "checkpoint-4 is damaged (optimizer.pt is not a whole torch file)" in caplog.text
    # set aside under a hidden name: the Trainer's checkpoint rotation would otherwise count it and delete `older`
    assert not newer.exists() and (newer.parent / ".damaged-checkpoint-4" / "optimizer.pt").is_file()
    assert checkpoints.damage(older) is None and checkpoints.latest_loadable(tmp_path) == older


def test_a_checkpoint_missing_its_weights_is_passed_over(tmp_path, caplog):
    """A kill while an old checkpoint was pruned left it marked complete without its adapter (the files went in
    directory order): every --resume then failed in transformers with "Can't find a valid checkpoint"."""
    older, newer = _fake_checkpoint(tmp_path, 2), _fake_checkpoint(tmp_path, 4)
    (newer / "adapter_model.safetensors").unlink()
    with caplog.at_level(logging.WARNING):
        assert checkpoints.prepare_resume(tmp_path) == older
    assert "checkpoint-4 is damaged (its weights (adapter_model.safetensors or model.safetensors" in caplog.text
    sharded = _fake_checkpoint(tmp_path / "full", 6)
    (sharded / "adapter_model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert checkpoints.damage(sharded) == "model-00002-of-00002.safetensors (a shard its index names) is missing"


def test_a_checkpoint_missing_its_optimizer_schedule_or_random_state_is_passed_over(tmp_path, caplog):
    """Marked complete without optimizer.pt / scheduler.pt / rng_state.pth (a kill while `train --force` cleared the
    run, which removed files in directory order), transformers resumed on a fresh optimizer, learning rate 0 at the
    next step, without a word."""
    older, newer = _fake_checkpoint(tmp_path, 2), _fake_checkpoint(tmp_path, 4)
    (newer / "optimizer.pt").unlink()
    (newer / "rng_state.pth").unlink()
    with caplog.at_level(logging.WARNING):
        assert checkpoints.prepare_resume(tmp_path) == older
    assert "checkpoint-4 is damaged (optimizer.pt, rng_state.pth are missing)" in caplog.text
    (older / "scheduler.pt").unlink()
    assert checkpoints.damage(older) == "scheduler.pt is missing"
    (older / checkpoints.MARKER).write_text(json.dumps({"step": 2, "world_size": 2, "deepspeed_stage": 3}))
    assert checkpoints.damage(older) is None  # DeepSpeed keeps the optimizer and schedule in global_step*/


def test_pruning_unmarks_a_checkpoint_before_deleting_it(tiny_recipe, tmp_path, monkeypatch):
    """Pruned by the marker callback alone (the Trainer's own rotation deleted the newest complete checkpoint before
    the new one was marked), and unmarked first: a kill mid-deletion leaves a folder resume removes."""
    from peftkit.config import recipe_from_dict
    from peftkit.train.run import training_arguments

    recipe = recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "early_stopping_patience": 2,
                                                        "eval_steps": 2, "save_total_limit": 1}})
    assert training_arguments(recipe, tmp_path / "run", "cpu", torch.float32, True).save_total_limit is None
    first, second = _fake_checkpoint(tmp_path, 2), _fake_checkpoint(tmp_path, 4)
    monkeypatch.setattr(checkpoints.shutil, "rmtree", lambda *a, **k: None)  # killed before any file went
    checkpoints.CompleteMarkerCallback(keep=1)._prune(tmp_path / "checkpoints", second, None)
    assert not checkpoints.is_complete(first) and checkpoints.is_complete(second)
    assert checkpoints.latest_loadable(tmp_path) == second


@pytest.mark.parametrize("cut", [0, 5, 60, -4])
def test_a_cut_short_safetensors_file_damages_its_checkpoint(tmp_path, cut):
    folder = _fake_checkpoint(tmp_path, 2)
    weights = folder / "adapter_model.safetensors"
    size = weights.stat().st_size
    assert checkpoints.damage(folder) is None
    os.truncate(weights, cut if cut >= 0 else size + cut)
    assert checkpoints.damage(folder) == "adapter_model.safetensors is not a whole safetensors file"


def test_a_safetensors_file_with_bytes_appended_is_damage(tmp_path):
    folder = _fake_checkpoint(tmp_path, 2)
    with (folder / "adapter_model.safetensors").open("ab") as f:
        f.write(b"\0" * 16)
    assert checkpoints.damage(folder) is not None


def test_no_loadable_checkpoint_is_one_clear_error(tmp_path):
    only = _fake_checkpoint(tmp_path, 2)
    (only / "trainer_state.json").write_text('{"global_step": 2')
    assert checkpoints.damage(only) == "trainer_state.json is not valid JSON"
    with pytest.raises(RunDirError, match="every checkpoint .* is damaged"):
        checkpoints.prepare_resume(tmp_path)


def test_sigterm_after_training_leaves_a_resumable_run_and_says_so(tiny_model_dir, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    recipe_file = tiny_recipe_file(tmp_path, tiny_model_dir)

    class Terminated(BaseException):
        pass

    def terminated(signum, frame):
        raise Terminated()

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    previous = signal.signal(signal.SIGTERM, terminated)  # as the CLI's handler: the run must not meet it
    try:
        with monkeypatch.context() as patch:
            patch.setattr(run_module, "final_eval_loss", signalled)
            with pytest.raises(TrainingInterrupted) as caught:
                train(load_recipe(recipe_file))
        assert signal.getsignal(signal.SIGTERM) is terminated
    finally:
        signal.signal(signal.SIGTERM, previous)
    run_dir = tmp_path / "run"
    assert caught.value.exit_code == 143 and "--resume" in str(caught.value)
    record = json.loads((run_dir / INTERRUPTED_FILE).read_text())
    assert record["step"] == 12 and record["signal"] == "SIGTERM" and record["resume"].endswith("--resume")
    assert train(load_recipe(recipe_file), resume=True).summary["steps"] == 12


def test_the_launching_process_records_its_own_resume_command(tmp_path, monkeypatch):
    monkeypatch.delenv("PEFTKIT_WORKER", raising=False)
    monkeypatch.setattr("sys.argv", ["peftkit", "train", "np.yaml", "--nproc", "2"])
    (tmp_path / INTERRUPTED_FILE).write_text(json.dumps(
        {"step": 3, "checkpoint": str(tmp_path / "checkpoints" / "checkpoint-3"), "signal": "SIGINT",
         "resume": f"peftkit train {tmp_path} --resume"}))
    record = read_interrupted(tmp_path)
    assert record is not None and record["resume"] == "peftkit train np.yaml --nproc 2 --resume"
    assert json.loads((tmp_path / INTERRUPTED_FILE).read_text())["resume"] == record["resume"]


def test_ctrl_c_prints_no_empty_record(tiny_model_dir, tmp_path, capfd):
    from transformers import TrainerCallback

    torch.set_num_threads(1)

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(load_recipe(tiny_recipe_file(tmp_path, tiny_model_dir)), extra_callbacks=[CtrlC()])
    out, err = capfd.readouterr()
    assert "SIGINT: saving a checkpoint" in err
    assert "{}" not in out + err


def test_the_progress_bar_skips_an_emptied_record_and_writes_its_log_lines_to_stderr(capsys):
    bar = ProgressBar()
    bar.training_bar = SimpleNamespace(write=lambda text: print(text, file=sys.stdout))  # as tqdm.write's default
    state = SimpleNamespace(is_world_process_zero=True)
    bar.on_log(None, state, None, logs={})
    bar.on_log(None, state, None, logs={"loss": 1.0, "total_flos": 3.0})
    out, err = capsys.readouterr()
    assert out == ""  # stdout holds what a command reports
    assert err.count("loss") == 1 and "total_flos" not in err


def test_a_log_file_gets_no_cursor_moves_from_evaluations_during_training(tmp_path, tiny_model_dir):
    """A bar under the training bar is drawn with cursor-up escapes, which a log file (nohup, a job log) keeps."""
    from tests.train_procs import peftkit, run, subprocess_env

    recipe = tiny_recipe_file(tmp_path, tiny_model_dir, train={"max_steps": 4, "eval_steps": 2, "save_steps": 2})
    log = tmp_path / "train.log"
    done = run(peftkit("train", str(recipe)), subprocess_env(tmp_path), log, timeout=300)
    text = log.read_text(encoding="utf-8", errors="replace")
    assert done.returncode == 0, text[-3000:]
    assert text.count("'eval_loss'") == 2 and "\x1b[" not in text


def test_metrics_time_goes_on_from_the_earlier_sessions(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 4, "time": 100.0, "loss": 1.0}) + "\n")
    callback = MetricsJsonlCallback(path)
    callback.on_log(None, SimpleNamespace(is_world_process_zero=True, global_step=5, epoch=1.0), None, logs={"loss": 0.9})
    last = json.loads(path.read_text().splitlines()[-1])
    assert last["step"] == 5 and 100.0 <= last["time"] < 110.0


def test_a_classifier_stopped_by_ctrl_c_resumes_into_the_whole_runs_summary(tiny_bert_dir, tmp_path):
    from transformers import TrainerCallback

    from peftkit.config.load import recipe_from_dict

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    def recipe(folder: Path):
        folder.mkdir()
        return recipe_from_dict(classification_recipe(tiny_bert_dir, folder, {"method": "lora", "r": 4, "alpha": 8}, max_steps=8,
                                        save_steps=100))

    def unhandled(signum, frame):
        raise RuntimeError("the run did not take the Ctrl-C")

    want = train(recipe(tmp_path / "whole")).summary
    stopped = recipe(tmp_path / "stopped")
    previous = signal.signal(signal.SIGINT, unhandled)
    try:
        with pytest.raises(TrainingInterrupted):
            train(stopped, extra_callbacks=[CtrlC()])
    finally:
        signal.signal(signal.SIGINT, previous)
    run_dir = tmp_path / "stopped" / "run"
    assert json.loads((run_dir / INTERRUPTED_FILE).read_text())["step"] == 4
    got = train(stopped, resume=True).summary
    assert got["steps"] == 8
    for key in ("eval_loss_before", "eval_accuracy_before", "heldout_accuracy_before", "trained_tokens"):
        assert got[key] is not None and got[key] == want[key], key
    assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-4)
    # metrics.jsonl's end-of-training record is the whole run's too, not the resumed session's alone
    ends = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]
    assert len(ends) == 1 and ends[0]["train_loss"] == pytest.approx(want["train_loss"], abs=1e-4)


@pytest.mark.parametrize("eval_steps, warned", [(5, True), (3, True), (2, False)])
def test_early_stopping_in_a_run_too_short_to_evaluate_is_said(tiny_model_dir, tmp_path, caplog, eval_steps, warned):
    torch.set_num_threads(1)
    recipe_file = tiny_recipe_file(tmp_path, tiny_model_dir, train={**EARLY, "max_steps": 3, "eval_steps": eval_steps,
                                                                  "early_stopping_patience": 1})
    with caplog.at_level(logging.WARNING):
        train(load_recipe(recipe_file))
    said = (f"train.early_stopping_patience has nothing to watch: the run evaluates every {eval_steps} steps "
            "(train.eval_steps) and trains 3, so it never evaluates (nor saves a checkpoint) before the end; set "
            "train.eval_steps below 3, or drop early_stopping_patience")
    assert (said in caplog.text) is warned
    evaluated = [r for r in map(json.loads, (recipe_file.parent / "run" / "metrics.jsonl").read_text().splitlines())
                 if "eval_loss" in r and 0 < r["step"] < 3]  # not the evaluations before and after training
    assert bool(evaluated) is not warned  # what the warning says: no evaluation while training


def test_early_stopping_in_a_one_epoch_run_evaluated_per_epoch_is_said(tiny_model_dir, tmp_path, caplog):
    torch.set_num_threads(1)
    recipe_file = tiny_recipe_file(tmp_path, tiny_model_dir, train={**EARLY, "max_steps": None, "epochs": 1,
                                                                  "eval_steps": None, "save_steps": None,
                                                                  "early_stopping_patience": 1})
    with caplog.at_level(logging.WARNING):
        train(load_recipe(recipe_file))
    assert "nothing to watch: the run evaluates after each epoch and trains one, so it never evaluates" in caplog.text


def test_a_run_killed_in_an_epochs_closing_evaluation_resumes_into_the_same_run(tiny_model_dir, tmp_path, monkeypatch):
    """Two faults of a checkpoint on an epoch's last step, saved before the evaluation that closes the epoch: the
    evaluation drew from training's random stream (its DataLoader draws a seed), so the resumed run trained on
    other dropout masks (0.03 apart in the adapter here, and no error anywhere); and a run killed during that
    evaluation resumed past it, never running it. The checkpoint now waits for the evaluation, which draws nothing."""
    from peftkit.train.trainer import RunTrainer

    settings = {"train": {"max_steps": None, "epochs": 2, "save_steps": 1, "save_total_limit": 40},
                "extra": {"adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1}}}
    torch.set_num_threads(1)
    reference = train(load_recipe(tiny_recipe_file(tmp_path / "reference", tiny_model_dir, **settings))).run_dir
    recipe_file = tiny_recipe_file(tmp_path / "killed", tiny_model_dir, **settings)
    evaluate = RunTrainer.evaluate

    def killed_when_evaluating_in_training(self, *args, **kwargs):
        if self.is_in_train:
            raise Killed()
        return evaluate(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(RunTrainer, "evaluate", killed_when_evaluating_in_training)
        with pytest.raises(Killed):
            train(load_recipe(recipe_file))
    run_dir = recipe_file.parent / "run"
    saved = [checkpoints.step_of(p) for p in checkpoints.checkpoint_dirs(run_dir) if checkpoints.is_complete(p)]
    steps = json.loads((reference / "summary.json").read_text())["steps"]
    assert max(saved) == steps // 2 - 1  # killed in the first epoch's evaluation, which its last step's save awaits

    train(load_recipe(recipe_file), resume=True)
    resumed, uninterrupted = adapter_tensors(run_dir / "adapter"), adapter_tensors(reference / "adapter")
    assert resumed.keys() == uninterrupted.keys() and resumed
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], atol=1e-6, rtol=0)

    def evaluations(folder: Path) -> list[tuple[int, float]]:
        records = map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
        return [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]

    assert [step for step, _ in evaluations(reference)] == [0, steps // 2, steps]  # before training, each epoch
    resumed_evals, evals = evaluations(run_dir), evaluations(reference)
    assert [step for step, _ in resumed_evals] == [step for step, _ in evals]
    assert [loss for _, loss in resumed_evals] == pytest.approx([loss for _, loss in evals], abs=1e-6)


def test_a_run_stopped_between_its_adapter_and_its_summary_is_finished_not_used(tiny_model_dir, tmp_path):
    """Killed after adapter/ was written but before the tokenizer and summary.json: chat, eval and merge used the run
    with the base model's tokenizer, without a word. They now name the resume that finishes it."""
    import shutil

    from peftkit.export.merge import resolve_run
    from peftkit.runs import load_run

    path = tiny_recipe_file(tmp_path, tiny_model_dir, train={"max_steps": 4})
    run_dir = train(load_recipe(path)).run_dir
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "tokenizer")
    for use in (load_run, resolve_run):
        with pytest.raises(RunDirError, match=r"did not finish: it stopped after writing adapter/ but before summary.json; "
                                              r"resume it with .*--resume"):
            use(run_dir)
    train(load_recipe(path), resume=True)
    assert (run_dir / "tokenizer").is_dir() and load_run(run_dir).model is not None


def test_a_second_ctrl_c_says_which_checkpoint_the_run_resumes_from(tiny_model_dir, tmp_path, caplog):
    """Quitting without saving printed `interrupted` alone, leaving the user to guess whether anything was kept."""
    from transformers import TrainerCallback

    class SecondCtrlC(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    path = tiny_recipe_file(tmp_path, tiny_model_dir, train={"max_steps": 6})
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        train(load_recipe(path), extra_callbacks=[SecondCtrlC()])
    assert "Quit without saving: the run resumes from its last checkpoint, step 2 (checkpoint-2)" in caplog.text
    assert "--resume" in caplog.text


def test_a_resumed_run_logs_the_losses_the_uninterrupted_run_logs(tiny_model_dir, tmp_path, monkeypatch):
    """transformers restarts its running loss average at the step it resumes from: with `logging_steps` 3 and a
    checkpoint at step 4, the resumed run logged the mean of steps 5-6 at step 6 where the uninterrupted run logged
    that of 4-6. Every checkpoint is now a logging point, so both runs log the same records."""
    from transformers import TrainerCallback

    settings = {"train": {"max_steps": 9, "save_steps": 2, "logging_steps": 3, "save_total_limit": 20}}
    torch.set_num_threads(1)
    reference = train(load_recipe(tiny_recipe_file(tmp_path / "reference", tiny_model_dir, **settings))).run_dir

    class KilledAtStep5(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 4 and checkpoints.latest_complete(Path(args.output_dir).parent) is not None:
                raise Killed()

    recipe_file = tiny_recipe_file(tmp_path / "killed", tiny_model_dir, **settings)
    with pytest.raises(Killed):
        train(load_recipe(recipe_file), extra_callbacks=[KilledAtStep5()])
    train(load_recipe(recipe_file), resume=True)

    def losses(run_dir: Path) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]

    resumed, uninterrupted = losses(recipe_file.parent / "run"), losses(reference)
    assert [step for step, _ in uninterrupted] == [2, 3, 4, 6, 8, 9]  # each checkpoint, and every 3rd step
    assert [step for step, _ in resumed] == [step for step, _ in uninterrupted]
    for (_, got), (_, want) in zip(resumed, uninterrupted):
        assert got == pytest.approx(want, abs=1e-6)


def test_a_stop_on_an_epochs_last_step_saves_before_the_closing_evaluation(tiny_model_dir, tmp_path):
    """A Ctrl-C's checkpoint must not wait for the evaluation that closes the epoch: a second Ctrl-C or a scheduler's
    kill during that evaluation would lose it (only the checkpoints that training goes on from wait for it)."""
    from transformers import TrainerCallback

    from peftkit.train.trainer import RunTrainer

    class StopAtFirstEpochEnd(TrainerCallback):  # as InterruptCallback stops: save at the end of this step, then stop
        def on_step_end(self, args, state, control, **kwargs):
            if float(state.epoch).is_integer():
                control.should_save = control.should_training_stop = True

    evaluate = RunTrainer.evaluate

    def killed_when_evaluating_in_training(self, *args, **kwargs):
        if self.is_in_train:
            raise Killed()
        return evaluate(self, *args, **kwargs)

    recipe_file = tiny_recipe_file(tmp_path, tiny_model_dir, train={"max_steps": None, "epochs": 2, "save_steps": 5})
    original = RunTrainer.evaluate
    RunTrainer.evaluate = killed_when_evaluating_in_training
    try:
        with pytest.raises(Killed):
            train(load_recipe(recipe_file), extra_callbacks=[StopAtFirstEpochEnd()])
    finally:
        RunTrainer.evaluate = original
    saved = [checkpoints.step_of(p) for p in checkpoints.checkpoint_dirs(recipe_file.parent / "run")
             if checkpoints.is_complete(p)]
    assert saved == [3]  # the first epoch's last step, saved before the evaluation the kill interrupted


def test_a_run_of_fractional_epochs_resumed_after_its_last_step_trains_no_step_more(tiny_model_dir, tmp_path):
    """`epochs: 1.5` plans a step count that no epoch ends on: resumed after its last checkpoint, the run trained one
    step more than planned (the recipe's max_steps, empty here, was all that was checked)."""
    path = tiny_recipe_file(tmp_path, tiny_model_dir, train={"max_steps": None, "epochs": 1.5, "save_steps": 1})
    run_dir = train(load_recipe(path)).run_dir
    steps = json.loads((run_dir / "summary.json").read_text())["steps"]
    (run_dir / "summary.json").unlink()  # as if killed after its last checkpoint
    train(load_recipe(path), resume=True)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == steps
    assert max(r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())) == steps


def _eval_steps_in_event_files(log_dir: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [event.step for path in sorted(log_dir.glob("events.out.tfevents.*"))
            for event in EventFileLoader(str(path)).Load()
            if any(value.tag == "eval/loss" for value in event.summary.value)]


def test_a_run_killed_after_its_final_evaluation_logs_that_evaluation_once_when_resumed(tiny_model_dir, tmp_path,
                                                                                       monkeypatch):
    """Training stops mid-epoch at max_steps: its checkpoint is written before the final evaluation, so a resumed run
    evaluates again, and the evaluation the killed session logged at that step must not stay beside the new one."""
    torch.set_num_threads(1)
    recipe_file = tiny_recipe_file(tmp_path, tiny_model_dir, train={"max_steps": 4, "save_steps": 100})

    def kill(*args, **kwargs):
        raise Killed()

    with monkeypatch.context() as patch:
        patch.setattr(run_module, "_sample_answers", kill)  # after the final evaluation, before the summary
        with pytest.raises(Killed):
            train(load_recipe(recipe_file))
    run_dir = tmp_path / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "eval_loss" in r][-1]
    assert final["step"] == 4 and not float(final["epoch"]).is_integer(), "the setup needs a stop mid-epoch"
    assert _eval_steps_in_event_files(run_dir / "tensorboard").count(4) == 1

    train(load_recipe(recipe_file), resume=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r["step"] for r in records if "eval_loss" in r]
    assert evaluated.count(4) == 1 and evaluated.count(3) == 1  # the epoch's closing evaluation stays
    assert _eval_steps_in_event_files(run_dir / "tensorboard").count(4) == 1


def test_an_evaluation_before_a_checkpoint_at_its_step_is_kept_on_resume(tmp_path):
    """Only an evaluation logged after the checkpoint's save goes: one the checkpoint's trainer_state holds (the
    epoch's closing evaluation, eval_steps) is not run again when resumed."""
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    state = {"global_step": 4, "max_steps": 4, "log_history": [{"loss": 2.0, "step": 4}, {"eval_loss": 1.9, "step": 4}]}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    assert checkpoints.evaluated_before_save(checkpoint)
    state["log_history"] = state["log_history"][:1]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    assert not checkpoints.evaluated_before_save(checkpoint)  # the last step: its final evaluation runs again
    (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "max_steps": 9}))
    assert checkpoints.evaluated_before_save(checkpoint)  # mid-run: an evaluation after the save is not run again

    path = tmp_path / "metrics.jsonl"
    records = [{"step": 2, "eval_loss": 2.1}, {"step": 4, "loss": 2.0}, {"step": 4, "eval_loss": 1.9}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert checkpoints.truncate_metrics(path, 4) == 0
    assert checkpoints.truncate_metrics(path, 4, evaluated_at_step=False) == 1
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:2]


def test_a_ctrl_c_on_an_epochs_last_step_keeps_that_epochs_evaluation_when_resumed(tiny_model_dir, tmp_path,
                                                                                    monkeypatch):
    """The signal's checkpoint there is written before the epoch's evaluation, like the last step's; but the resumed
    run starts the next epoch and never runs that evaluation again, so it is not one to drop."""
    import transformers.trainer as hf_trainer

    torch.set_num_threads(1)
    recipe_file = tiny_recipe_file(tmp_path, tiny_model_dir, train={"max_steps": None, "epochs": 3, "save_steps": 100})
    original = hf_trainer.Trainer.training_step

    def interrupted_in_step_3(self, *args, **kwargs):  # the last step of epoch 1 (3 steps an epoch)
        out = original(self, *args, **kwargs)
        if self.state.global_step == 2 and not getattr(self, "_signalled", False):
            self._signalled = True
            os.kill(os.getpid(), signal.SIGINT)
        return out

    with monkeypatch.context() as patch:
        patch.setattr(hf_trainer.Trainer, "training_step", interrupted_in_step_3)
        with pytest.raises(TrainingInterrupted):
            train(load_recipe(recipe_file))
    run_dir = tmp_path / "run"

    def evaluated() -> list[int]:
        return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if "eval_loss" in json.loads(line)]

    assert 3 in evaluated() and [c.name for c in checkpoints.checkpoint_dirs(run_dir)] == ["checkpoint-3"]
    train(load_recipe(recipe_file), resume=True)
    assert evaluated().count(3) == 1 and evaluated()[-2:] == [6, 9]
    assert _eval_steps_in_event_files(run_dir / "tensorboard").count(3) == 1
