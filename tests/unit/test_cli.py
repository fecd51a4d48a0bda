"""The CLI: clear one-paragraph errors, exit code 2, no traceback."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peftkit.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftkit.cli", *args], capture_output=True, text=True, timeout=120)


def test_validate_ok(tiny_recipe, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    assert main(["validate", str(path)]) == 0
    assert "recipe is valid" in capsys.readouterr().out


def test_validate_warns_of_a_batch_larger_than_the_data_as_training_does(tiny_recipe, tmp_path, caplog):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**tiny_recipe, "train": {**tiny_recipe["train"], "batch_size": 64}}))
    with caplog.at_level("WARNING"):
        assert main(["validate", str(path)]) == 0
    assert "The global batch (64 = batch_size x grad_accum x processes) is larger than the" in caplog.text


def test_validate_warns_of_an_output_dir_train_would_refuse(tiny_recipe, tmp_path, capsys, caplog):
    from pathlib import Path

    from peftkit.train.run_dir import mark_run_dir

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    run_dir = Path(tiny_recipe["output_dir"])
    assert main(["validate", str(path), "--no-model"]) == 0
    assert "would refuse to start" not in caplog.text, "no run there yet"
    mark_run_dir(run_dir, "{}")
    (run_dir / "summary.json").write_text("{}")
    assert main(["validate", str(path), "--no-model"]) == 0
    assert f"`peftkit train` would refuse to start: {run_dir} already holds a finished run" in caplog.text
    assert "recipe is valid" in capsys.readouterr().out
    from peftkit.train.run_dir import run_lock

    (run_dir / "summary.json").unlink()
    caplog.clear()
    with run_lock(run_dir):  # a run training into it: not "an unfinished run that saved no checkpoint; --force"
        assert main(["validate", str(path), "--no-model"]) == 0
    assert f"would refuse to start: {run_dir} is in use: peftkit is training into it (pid {os.getpid()}" in caplog.text


def test_validate_warns_and_goes_on_where_the_output_dir_cannot_be_read(tiny_recipe, tmp_path, caplog, monkeypatch):
    from peftkit.train import run_dir

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run_dir, "check_run_dir", unreadable)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    assert main(["validate", str(path), "--no-model"]) == 0
    assert f"output_dir {tiny_recipe['output_dir']} cannot be checked here: Permission denied" in caplog.text


def test_validate_reports_unknown_target_modules(tiny_recipe, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    assert main(["validate", str(path), "adapter.target_modules=[attn]"]) == 2
    err = capsys.readouterr().err
    assert "matches no linear module" in err and "q_proj" in err
    assert f"Invalid recipe in {path}:" in err, "a problem found after parsing names the recipe file too"


def test_set_flag_is_the_same_override_list(tiny_recipe, tmp_path, capsys):
    """`--set k=v` (the benchmarks' form) and positional `k=v` both reach the recipe, in order."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    assert main(["validate", str(path), "--set", "adapter.target_modules=[attn]"]) == 2
    assert "matches no linear module" in capsys.readouterr().err
    assert main(["validate", str(path), "adapter.target_modules=[attn]", "--set", "adapter.target_modules=[q_proj]"]) == 0
    assert main(["validate", "--set", "adapter.target_modules=[attn]", str(path)]) == 2, "--set before the recipe"
    assert "matches no linear module" in capsys.readouterr().err


def test_overrides_after_a_flag_still_reach_the_recipe(tiny_recipe, tmp_path, capsys):
    """`peftkit train r.yaml --force train.lr=1e-4` must not fail with argparse's "unrecognized arguments"."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    assert main(["validate", str(path), "--no-model", "train.lr=0"]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert main(["validate", str(path), "--no-model", "stray"]) == 2
    assert "unrecognized arguments: stray" in capsys.readouterr().err
    assert main(["validate", str(path), "--no-model", "train.lr"]) == 2  # the value left out
    assert "unrecognized arguments: train.lr (a recipe override is KEY=VALUE, e.g. train.lr=...)" in capsys.readouterr().err
    for stray in ("./runs/old", "extra.yaml"):  # not keys: no override hint
        assert main(["validate", str(path), "--no-model", stray]) == 2
        assert capsys.readouterr().err.rstrip().endswith(f"unrecognized arguments: {stray}")


def test_validate_show_data_marks_exactly_the_trained_tokens(tiny_recipe, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    assert main(["validate", str(path), "--show-data", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- row ") == 2
    trained = re.findall(r"\[\[(.*?)\]\]", out.split("--- row ", 1)[1], re.DOTALL)
    assert trained and all(t.endswith("<|im_end|>") for t in trained)  # each reply closes with its end-of-turn
    assert not any("<|im_start|>" in t or "user" in t for t in trained)  # prompts are context only


def test_validate_show_data_marks_the_prompt_trained_with_train_on_prompt(tiny_recipe, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    assert main(["validate", str(path), "--show-data", "1", "data.train_on_prompt=true"]) == 0
    row = capsys.readouterr().out.split("--- row ", 1)[1]
    trained = "".join(re.findall(r"\[\[(.*?)\]\]", row, re.DOTALL))
    assert "user" in trained and "<|im_end|>" in trained, "the user turn is trained too"
    # all but the row's first token, which the loss never predicts
    assert re.search(r"---\n<\|im_start\|>\[\[user", row), row[:200]


def test_resume_without_a_run_dir_does_not_swallow_the_override_after_it(monkeypatch, tmp_path):
    """`--resume` takes an optional RUN_DIR; `--resume train.lr=1e-4` means an override, not a directory."""
    import peftkit.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "cmd_train", lambda args: seen.update(vars(args)) or 0)
    assert main(["train", str(tmp_path / "r.yaml"), "--resume", "train.lr=1e-4", "--force", "train.epochs=2"]) == 0
    assert seen["resume"] == "last" and set(seen["overrides"]) == {"train.lr=1e-4", "train.epochs=2"}
    run_dir = tmp_path / "runs" / "a=b"  # a real directory whose name has `=` stays the run directory
    run_dir.mkdir(parents=True)
    assert main(["train", str(tmp_path / "r.yaml"), "--resume", str(run_dir)]) == 0
    assert seen["resume"] == str(run_dir) and seen["overrides"] == []


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epochs=0", "train.epochs"),
        ("adapter.r=-2", "adapter.r"),
        ("data.train=missing.jsonl", "does not exist"),
        ("model.name=/no/such/model", "does not exist"),
    ],
)
def test_bad_input_exits_2_without_traceback(tiny_recipe, tmp_path, override, expected):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    result = run_cli("train", str(path), override)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists(), "nothing is written before validation passes"


def test_chat_on_missing_run_dir(tmp_path):
    result = run_cli("chat", str(tmp_path / "nope"))
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_models_lists_builtins_and_what_each_cached_conversion_came_from(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path))
    one, two = tmp_path / "models" / "model-0123456789ab", tmp_path / "models" / "model-ba9876543210"
    for folder, source in ((one, {"converted_from": "/data/a/model.gguf"}), (two, ["damaged"])):  # same file name
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"\0" * 2_000_000)
        (folder / "peftkit_source.json").write_text(json.dumps(source))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "minilm-l6" in out
    assert "model-0123456789ab  (2 MB, from /data/a/model.gguf, a file no longer there)" in out
    assert "model-ba9876543210  (2 MB)" in out
    from peftkit.cli import _cached_model_note

    (tmp_path / "model.gguf").write_bytes(b"GGUF")  # a source still there is named alone
    (one / "peftkit_source.json").write_text(json.dumps({"converted_from": str(tmp_path / "model.gguf")}))
    assert _cached_model_note(one) == f"  (2 MB, from {tmp_path / 'model.gguf'})"
    # renamed: the conversion is used for the same content under its new name (the cache goes by content)
    from peftkit.models.gguf_convert import CONVERSION_VERSION

    renamed = tmp_path / "renamed.gguf"
    (tmp_path / "model.gguf").rename(renamed)
    (one / "config.json").write_text("{}")
    (one / "peftkit_source.json").write_text(json.dumps({"converted_from": str(tmp_path / "model.gguf"),
                                                         "conversion": CONVERSION_VERSION}))
    stat = renamed.stat()
    seen = [stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    (tmp_path / "models" / "gguf_fingerprints.json").write_text(json.dumps(
        {str(renamed): {"stat": seen, "sha256": "0123456789ab"}, "/gone.gguf": {"stat": [], "sha256": "0123456789ab"}}))
    assert _cached_model_note(one) == (f"  (2 MB, from {tmp_path / 'model.gguf'}, a file no longer there; used for "
                                       f"{renamed}, the same file under another name)")
    renamed.write_bytes(b"GGUF other")  # changed since it was hashed: its conversion is another one
    assert _cached_model_note(one).endswith(", a file no longer there)")


def test_validate_tokenizes_the_data_and_says_what_fits(tiny_recipe, tmp_path, capsys):
    """`validate` finds what would only fail in `train`: data that max_seq_len cuts to nothing."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    assert main(["validate", str(path)]) == 0
    said = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert re.search(r"Data: \d+ training rows \(chat format; \d+ cut at max_seq_len=64\), [\d,]+ trained tokens an epoch, \d+ eval rows",
                     said)
    assert main(["validate", str(path), "data.max_seq_len=8"]) == 2
    assert "max_seq_len=8" in capsys.readouterr().err


def test_recipe_mistakes_point_at_the_fix(tiny_recipe, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    assert main(["validate", str(path), "lr=1e-3"]) == 2
    assert "did you mean `train.lr`?" in capsys.readouterr().err
    assert main(["validate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a folder without recipe.yaml; give the recipe file itself" in err and "it holds r.yaml" in err
    assert main(["validate", str(path), "data.eval_fraction=0", "train.early_stopping_patience=2", "--no-model"]) == 2
    assert "early_stopping_patience watches the eval loss" in capsys.readouterr().err


def test_validate_show_data_shows_the_first_trained_rows_with_their_lines(tiny_recipe, tmp_path, capsys):
    """Rows dropped for length are skipped (not shown as nothing), and each row names its file and line."""
    data = tmp_path / "long_first.jsonl"
    long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": [{"role": "user", "content": "hours?"}, {"role": "assistant", "content": "nine to five"}]}
    data.write_text("".join(json.dumps(r) + "\n" for r in [long, long, short, short]))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**tiny_recipe, "data": {**tiny_recipe["data"], "train": str(data), "eval_fraction": 0}}))
    assert main(["validate", str(path), "--show-data", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- row ") == 1 and f"({data}:3)" in out.replace("\n", "")


def test_a_tokenizer_bigger_than_the_model_is_refused_by_validate_and_train(tiny_recipe, tmp_path, capsys):
    """Tokens added to a tokenizer without resizing the model's embeddings: one message, not an IndexError at step 0."""
    from tests.conftest import build_tiny_llama, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model_dir = tmp_path / "small-vocab"
    build_tiny_llama(len(tokenizer) // 2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**tiny_recipe, "model": {"name": str(model_dir)}}))
    for command in (["validate"], ["train"]):
        assert main([*command, str(path)]) == 2
        err = capsys.readouterr().err
        assert f"has only {len(tokenizer) // 2} input embeddings" in " ".join(err.split()), err
    assert not Path(tiny_recipe["output_dir"]).exists()  # refused before the weights load: no run folder left


def test_tokens_beyond_the_models_embeddings_that_the_data_does_not_use_are_warned_and_refused_in_chat(
        tiny_recipe, tiny_model_dir, tmp_path, capsys, caplog):
    """validate and train passed (only the data's ids were checked), then chat died with an IndexError."""
    import shutil

    from transformers import AutoTokenizer

    model_dir = tmp_path / "added"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>", "<|sep|>"]})
    tokenizer.save_pretrained(model_dir)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**tiny_recipe, "model": {"name": str(model_dir)}, "output_dir": str(tmp_path / "run"),
                                    "train": {**tiny_recipe["train"], "max_steps": 1}, "eval": {"before": False}}))
    assert main(["validate", str(path)]) == 0
    assert "the tokenizer has 402 tokens, but the model" in caplog.text and "'<|tool|>', '<|sep|>'" in caplog.text
    caplog.clear()
    assert main(["train", str(path)]) == 0
    assert caplog.text.count("the tokenizer has 402 tokens, but the model") == 1  # checked before and after loading
    capsys.readouterr()
    assert main(["chat", str(tmp_path / "run"), "--prompt", "use <|tool|> please"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "the prompt has tokens the model has no embedding for ('<|tool|>', ids from 400 on)" in err


def test_the_command_starts_without_importing_torch():
    """`peftkit --version` (and argument errors) answer at once; torch loads only for commands that use it."""
    probe = ("import sys\nfrom peftkit.cli import build_parser\nbuild_parser()\n"
             "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
    from peftkit.evaluate import is_correct  # the package's names still load, on first use

    assert is_correct("It opens at nine.", ["nine"])


def test_ctrl_c_while_the_command_starts_is_one_line(monkeypatch, capsys):
    import peftkit.cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(peftkit.cli, "build_parser", interrupted)
    assert main(["models"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted (Ctrl-C): stopped before finishing;") and err.count("\n") == 1, err


def test_sigterm_stops_a_command_without_leaving_a_child_or_a_half_written_folder(monkeypatch, tmp_path, capsys):
    """A merge's verification runs in a child process and writes into a temporary folder: SIGTERM (a job
    scheduler, `kill`) must end both, as Ctrl-C does, instead of leaving the child running and the copy behind."""
    import os
    import signal
    import threading

    import peftkit.cli
    from peftkit.utils.atomic import atomic_directory

    pid_file = tmp_path / "child.pid"

    def slow_export(args):
        with atomic_directory(tmp_path / "merged") as tmp:
            (tmp / "model.safetensors").write_text("partial")
            threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
            subprocess.run([sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                            "time.sleep(60)"], check=True)
        return 0

    monkeypatch.setattr(peftkit.cli, "cmd_models", slow_export)
    assert main(["models"]) == 143
    assert capsys.readouterr().err == "terminated (SIGTERM)\n"
    assert not (tmp_path / "merged").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
    assert signal.getsignal(signal.SIGTERM) is not peftkit.cli._raise_terminated, "restored after the command"


def test_launch_options_that_make_no_sense_are_refused_before_training(tiny_recipe, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    assert main(["train", str(path), "--nproc", "0"]) == 2
    assert "--nproc must be at least 1, got 0" in capsys.readouterr().err
    assert main(["train", str(path), "--node-rank", "5"]) == 2
    assert "--node-rank must be in 0..0, got 5" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_deepspeeds_cpu_accelerator_notice_is_not_shown_on_every_cpu_run(capsys):
    """transformers imports DeepSpeed on every run; on a machine without a GPU it warned "unable to detect" a GPU."""
    import logging

    from peftkit.cli import _setup_logging

    _setup_logging(False)
    logger = logging.getLogger("DeepSpeed")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    try:
        logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        logger.warning("a DeepSpeed warning that matters")
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert "Setting accelerator to CPU" not in err and "a DeepSpeed warning that matters" in err


def test_only_rank_0_tells_the_story_under_a_launcher(monkeypatch):
    import logging

    from peftkit.cli import _setup_logging

    monkeypatch.setenv("RANK", "1")
    _setup_logging(False)
    assert logging.getLogger("peftkit").level == logging.WARNING  # the first process of another node warns
    monkeypatch.setenv("LOCAL_RANK", "1")
    _setup_logging(False)
    assert logging.getLogger("peftkit").level == logging.ERROR  # the others would repeat rank 0's warnings
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    _setup_logging(False)
    assert logging.getLogger("peftkit").level == logging.INFO


def test_verbose_goes_after_the_command_too_and_shows_the_traceback(tmp_path, capsys):
    missing = str(tmp_path / "missing.yaml")
    assert main(["validate", missing]) == 2
    assert "Traceback" not in capsys.readouterr().err
    for argv in (["validate", missing, "-v"], ["-v", "validate", missing]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error: ") and "missing.yaml" in err


def test_chat_tools_a_template_leaves_out_are_refused_before_the_weights_load(tiny_recipe, tmp_path, monkeypatch, capsys):
    import peftkit.runs
    from peftkit.config import recipe_from_dict
    from peftkit.train.run import train

    recipe = {**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 1}, "eval": {"before": False}}
    run_dir = train(recipe_from_dict(recipe)).run_dir  # the tiny model's own ChatML template: no tools
    tools = tmp_path / "tools.json"
    tools.write_text('[{"type": "function", "function": {"name": "find_book", "parameters": {"type": "object"}}}]')

    def loaded(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(peftkit.runs, "load_run", loaded)
    assert main(["chat", str(run_dir), "--tools", str(tools), "--prompt", "hi"]) == 2
    assert "leaves the tool schemas out of the prompt ('find_book'" in capsys.readouterr().err


def test_validate_takes_the_train_commands_deepspeed_and_process_count(tiny_recipe, tmp_path, capsys):
    """`peftkit validate` checks the command line `train` would get: --deepspeed, and --nproc for what depends on it."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"train_batch_size": 2 * tiny_recipe["train"]["batch_size"],
                                   "zero_optimization": {"stage": 2}}))
    assert main(["validate", str(path), "--deepspeed", "3", "--no-model"]) == 0
    assert main(["validate", str(path), "--deepspeed", str(ds_json), "--nproc", "2", "--no-model"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert said.count("recipe is valid (lora on") == 2
    assert said.count("without the checks that read the model (target modules, sizes, tokenized data: --no-model)") == 2
    assert main(["validate", str(path), "--deepspeed", str(ds_json), "--nproc", "3", "--no-model"]) == 2
    assert "but this run trains 3 process(es)" in capsys.readouterr().err
    assert main(["validate", str(path), "--deepspeed", str(ds_json), "--no-model"]) == 2  # one process, as train
    assert "but this run trains 1 process(es)" in capsys.readouterr().err
    assert main(["validate", str(path), "--deepspeed", str(ds_json), "--nnodes", "2", "--master-addr", "10.0.0.1",
                 "--no-model"]) == 0
    assert main(["validate", str(path), "--nproc", "0", "--no-model"]) == 2
    assert "--nproc must be at least 1" in capsys.readouterr().err
    assert main(["validate", str(path), "--deepspeed", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert "--deepspeed" in err and "no such file" in err


def test_log_lines_go_to_stderr_unwrapped_and_what_a_command_prints_to_stdout(tiny_recipe, tmp_path):
    recipe = {**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 3, "epochs": 2}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli("validate", str(path), "--no-model")
    assert result.returncode == 0, result.stderr
    assert "recipe is valid" in result.stdout and "WARNING" not in result.stdout
    warned = [line for line in result.stderr.splitlines() if "train.epochs is ignored" in line]
    assert warned and warned[0].startswith("WARNING") and warned[0].endswith("sets the length of training")


def test_a_recipe_after_resume_gets_a_hint_not_only_argparses_complaint(tiny_recipe, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    assert main(["train", "--resume", str(path)]) == 2
    err = capsys.readouterr().err
    assert "overrides" not in err and err.count("error:") == 1
    assert f"--resume takes an optional RUN_DIR, so it took the file {path}; put the recipe first: peftkit train {path} --resume" in err
    assert main(["train"]) == 2
    assert "train needs a recipe file, or a run directory to resume" in capsys.readouterr().err


def test_a_home_relative_recipe_after_resume_gets_the_same_hint(tiny_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))
    assert main(["train", "--resume", "~/r.yaml"]) == 2
    assert "--resume takes an optional RUN_DIR, so it took the file ~/r.yaml; put the recipe first" in \
        capsys.readouterr().err


@pytest.mark.parametrize("form", [["--resume", "RUN"], ["--resume=RUN"]])
def test_resume_run_dir_alone_resumes_that_run(form, tiny_recipe, tmp_path, capsys):
    """`peftkit train --resume RUN_DIR`, as the README's `--resume RUN_DIR` reads: the run's own recipe.yaml."""
    from peftkit.config import recipe_from_dict
    from peftkit.train.run import train

    recipe = {**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 2, "save_steps": 1},
              "eval": {"before": False}}
    run_dir = train(recipe_from_dict(recipe)).run_dir
    (run_dir / "summary.json").unlink()  # as if killed after its last checkpoint
    capsys.readouterr()
    assert main(["train", *[a.replace("RUN", str(run_dir)) for a in form]]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    assert main(["train", *[a.replace("RUN", str(run_dir)) for a in form]]) == 2  # finished: nothing to resume
    assert "holds a finished run" in capsys.readouterr().err


PROGRESS_INTERVAL = ("import io, sys; from peftkit.cli import main; rc = main(sys.argv[1:]); import tqdm; "
                     "bar = tqdm.tqdm(range(1), file=io.StringIO()); print(rc, bar.mininterval, bar.maxinterval)")


def test_progress_bars_in_a_log_file_update_every_30s_unless_the_user_chose(tiny_recipe, tmp_path, monkeypatch):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    env = {k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"}
    command = [sys.executable, "-c", PROGRESS_INTERVAL, "validate", str(path), "--no-model"]
    piped = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)  # stderr: a pipe, not a terminal
    # the longest interval too: tqdm's monitor thread redrew a bar 10 s after its last update
    assert piped.stdout.splitlines()[-1] == "0 30.0 30.0", piped.stderr
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    assert main(["validate", str(path), "--no-model"]) == 0  # in-process: the caller's environment is left as it was
    assert "TQDM_MININTERVAL" not in os.environ
    chosen = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**env, "TQDM_MININTERVAL": "2"})
    assert chosen.stdout.splitlines()[-1] == "0 2.0 10.0", chosen.stderr

    from peftkit import cli

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.setattr(sys, "stderr", Terminal())
    with cli._progress_bars_for_logs():
        assert "TQDM_MININTERVAL" not in os.environ  # a terminal redraws in place: tqdm's own 0.1 s


def test_a_written_eval_limit_that_nothing_draws_is_said_to_be_ignored(tiny_recipe, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    result = run_cli("validate", str(path), "--no-model", "data.eval_fraction=0", "data.max_eval_examples=100")
    assert result.returncode == 0, result.stderr
    assert "data.max_eval_examples is ignored: it limits the eval split drawn by data.eval_fraction, and " \
           "data.eval_fraction is 0" in result.stderr
    assert "max_eval_examples" not in run_cli("validate", str(path), "--no-model").stderr


def test_main_from_python_puts_the_callers_state_back_and_returns_argparse_status(tiny_recipe, tmp_path, monkeypatch):
    """A notebook calling cli.main kept peftkit's INFO level, a root handler (so its own basicConfig did nothing),
    TOKENIZERS_PARALLELISM, transformers at error level and torch at the command's thread count; argparse's
    errors raised SystemExit instead of returning the documented status."""
    import logging
    import os

    import torch
    import transformers

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    torch.set_num_threads(2)
    root = logging.getLogger()
    handlers, peftkit_level = list(root.handlers), logging.getLogger("peftkit").level
    transformers.logging.set_verbosity_info()
    try:
        assert main(["validate", str(path), "--no-model"]) == 0
        assert list(root.handlers) == handlers and logging.getLogger("peftkit").level == peftkit_level
        assert "TOKENIZERS_PARALLELISM" not in os.environ and torch.get_num_threads() == 2
        assert transformers.logging.get_verbosity() == logging.INFO
        assert main(["no-such-command"]) == 2 and main(["--version"]) == 0
    finally:
        transformers.logging.set_verbosity_warning()


def test_a_file_size_limit_and_a_closed_pipe_get_their_own_endings(tiny_recipe, tmp_path, capsys, monkeypatch):
    """`ulimit -f` (or FAT32's 4 GB) was "no space left on device" with a disk half empty, or a safetensors
    traceback; `peftkit chat ... | head` ended in "Broken pipe; check the path and free space"."""
    import errno

    import peftkit.cli as cli
    from peftkit.errors import is_file_too_large

    assert is_file_too_large(OSError(errno.EFBIG, "File too large"))
    assert not is_file_too_large(OSError(errno.ENOSPC, "No space left on device"))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    for raised, code, said in ((Exception("Error while serializing: I/O error: File too large (os error 27)"), 2,
                                "a file grew past the largest file size allowed while writing an output file"),
                               (BrokenPipeError(errno.EPIPE, "Broken pipe"), 141, "")):
        def fail(*args, exc=raised):
            raise exc

        monkeypatch.setattr(cli, "_tokenized_data_line", fail)
        assert main(["validate", str(path)]) == code
        err = capsys.readouterr().err
        assert said in err and "no space left" not in err and ("error:" in err) == bool(said)


def test_a_closed_pipe_under_rich_output_ends_like_any_other_closed_pipe():
    """rich ended `peftkit validate --show-data 30 | head -n 1` with its own status 1 where `chat` ends with 141: the
    commands' console raises BrokenPipeError for the CLI's handler instead."""
    import signal

    from peftkit.utils.console import stdout_console

    read_end, write_end = os.pipe()
    os.close(read_end)
    previous = signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # Python's own setting; made explicit for the write
    stream = open(write_end, "w")
    try:
        console = stdout_console(file=stream)
        with pytest.raises(BrokenPipeError):
            console.print("a shown training row")
        assert console.quiet  # nothing more is written to the closed pipe
    finally:
        with contextlib.suppress(BrokenPipeError):  # the stream's own flush at close meets the closed pipe too
            stream.close()
        signal.signal(signal.SIGPIPE, previous)


def test_validate_without_a_recipe_names_only_the_recipe_as_required(capsys):
    """argparse listed the optional overrides as required too: `required: recipe, overrides`."""
    assert main(["validate"]) == 2
    assert capsys.readouterr().err.strip().endswith("the following arguments are required: recipe")


def test_a_full_disk_met_by_a_writer_thread_prints_no_thread_traceback(monkeypatch):
    """TensorBoard's writer thread met the full disk first: "Exception in thread Thread-1: Traceback ...", cut off by
    the command's own message. Other errors in threads still reach the hook before it (which prints them)."""
    import errno
    import threading

    from peftkit.cli import _full_disk_quiet_in_threads

    reached = []
    monkeypatch.setattr(threading, "excepthook", lambda args: reached.append(args.exc_type))

    def run(exc: BaseException) -> None:
        def fail() -> None:
            raise exc

        thread = threading.Thread(target=fail)
        thread.start()
        thread.join()

    before = threading.excepthook
    with _full_disk_quiet_in_threads():
        run(OSError(errno.ENOSPC, "No space left on device"))
        run(ValueError("a real bug"))
    assert reached == [ValueError] and threading.excepthook is before


def test_an_empty_prompt_is_refused_before_anything_loads(capsys):
    assert main(["chat", "no-such-run", "--prompt", " "]) == 2
    assert "argument --prompt: is empty; give the message to answer" in capsys.readouterr().err
