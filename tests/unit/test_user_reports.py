"""Testers' reports: held-out data read as training reads it, clean errors for common mistakes and failures."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tests.unit.export_fixtures import export_recipe, llama64_dir, make_run  # noqa: F401

from peftkit.cli import main
from peftkit.config import recipe_from_dict
from peftkit.data.build import build_datasets, load_heldout
from peftkit.errors import ConfigError, DataError, ModelNotFoundError, RunDirError

REPO = Path(__file__).resolve().parents[2]


def test_heldout_messages_are_normalised_like_training_messages(tmp_path):
    path = write_jsonl(tmp_path / "heldout.jsonl", [
        {"messages": [{"from": "human", "value": "When is trash day?"}], "key_fact": "Tuesday"},
        {"messages": [{"role": "human", "content": "When is pickup?"}], "key_fact": "Monday"},
        {"question": "Which bin for glass?", "system": "Be terse.", "key_fact": "blue"},
        {"messages": [{"role": "user", "content": "Bulky items?"}], "system": "Be terse.", "key_fact": "$25"},
    ])
    items = load_heldout(path, "You are a waste helper.")
    assert [m["role"] for m in items[0].messages] == ["system", "user"]
    assert items[0].question == "When is trash day?" and items[1].messages[-1] == {"role": "user", "content": "When is pickup?"}
    assert items[2].messages[0] == {"role": "system", "content": "Be terse."}, "a record-level system wins, as in training"
    assert items[3].messages[0] == {"role": "system", "content": "Be terse."}

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok?", "key_fact": "ok"},
                                               {"messages": ["When is trash day?"], "key_fact": "Tuesday"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: message 1 must be an object with `role` and `content`"):
        load_heldout(bad, None)
    no_role = write_jsonl(tmp_path / "no_role.jsonl", [{"messages": [{"content": "hi"}], "key_fact": "x"}])
    with pytest.raises(DataError, match=r"no_role\.jsonl:1: message 1"):
        load_heldout(no_role, None)


def test_heldout_question_copied_from_training_is_warned_once(tiny_recipe, tiny_tokenizer, tmp_path, caplog):
    heldout = write_jsonl(tmp_path / "copied.jsonl", [
        {"question": "What is the  WiFi password?", "key_fact": "river"},  # a training question, case and spaces aside
        {"question": "who runs the library?", "key_fact": "marta"},
    ])
    cfg = recipe_from_dict({**tiny_recipe, "data": {**tiny_recipe["data"], "heldout": str(heldout)}}).data
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        build_datasets(cfg, tiny_tokenizer)
        build_datasets(cfg, tiny_tokenizer)
    warned = [r.getMessage() for r in caplog.records if "held-out questions that the training data also asks" in r.getMessage()]
    assert len(warned) == 1 and "1 of 2" in warned[0] and "WiFi password" in warned[0]


def test_model_card_sends_the_recipes_system_prompt(tmp_path):
    from peftkit.train.model_card import _plain_use

    card = "\n".join(_plain_use(tmp_path, "You are a waste helper."))
    assert '{"role": "system", "content": "You are a waste helper."}' in card
    assert "trained with the system prompt \"You are a waste helper.\"" in card
    assert "AutoPeftModelForCausalLM.from_pretrained" in card and "apply_chat_template(messages" in card
    assert "system" not in "\n".join(_plain_use(tmp_path, None))


def test_chat_on_a_base_of_another_size_names_the_shapes(export_recipe, tiny_model_dir, tmp_path, capsys):
    run = make_run(tmp_path / "run", export_recipe, __import__("peft").LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    recipe_file = run / "recipe.yaml"
    recipe_file.write_text(recipe_file.read_text().replace(export_recipe["model"]["name"], str(tiny_model_dir)))
    from peftkit.runs import load_run

    with pytest.raises(RunDirError) as info:
        load_run(run)  # trained on hidden 64, the base is now hidden 32
    message = str(info.value)
    assert "does not fit the base model" in message and "hidden_size: adapter's base has 64, this base has 32" in message
    assert f"(`model.name` in {recipe_file})" in message and "size mismatch" not in message
    assert main(["chat", str(run), "--prompt", "hi"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "does not fit the base model" in err


def test_a_base_replaced_in_place_by_another_size_is_refused_before_its_weights_load(
        export_recipe, llama64_dir, tiny_model_dir, tmp_path, monkeypatch, caplog):
    """A trial copied a model of another hidden size over the base folder: chat and eval warned that the weights
    differ "unless this is intended", loaded every weight, then refused, naming the same path as the wrong base and
    the right one."""
    import logging
    import shutil

    import peftkit.runs
    from peftkit.runs import load_run

    base = tmp_path / "base"
    shutil.copytree(llama64_dir, base)
    run = make_run(tmp_path / "run", export_recipe, __import__("peft").LoraConfig(r=4, target_modules=["q_proj"]),
                   model_dir=base)
    from transformers import AutoConfig

    from peftkit.models.fingerprint import base_config_summary

    (run / "summary.json").write_text(json.dumps({"base_fingerprint": "v2-0123456789abcdef",  # as training writes them
                                                  "base_config": base_config_summary(AutoConfig.from_pretrained(base))}))
    shutil.rmtree(base)
    shutil.copytree(tiny_model_dir, base)  # hidden 32 now
    monkeypatch.setattr(peftkit.runs, "load_base_model", lambda *a, **k: pytest.fail("the base's weights loaded"))
    with caplog.at_level(logging.WARNING, logger="peftkit"), pytest.raises(RunDirError) as info:
        load_run(run)
    message = str(info.value)
    assert "hidden_size: adapter's base has 64, this base has 32" in message
    assert f"the model at {base} has been replaced since the run trained on it: put the original back there" in message
    assert "is not the one" not in caplog.text  # no "other weights, unless intended" warning before the refusal


def test_unreadable_weights_file_says_permission_denied(tiny_model_dir, monkeypatch):
    import os

    from peftkit.models.load import loading_errors
    from peftkit.models.resolve import resolve_model_ref

    source = resolve_model_ref(str(tiny_model_dir))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: not str(p).endswith(".safetensors") and real_access(p, mode))
    with pytest.raises(ModelNotFoundError, match=r"permission denied: .*model\.safetensors; make it readable"):
        with loading_errors(source, "the model"):
            raise FileNotFoundError(2, "No such file or directory")  # what safetensors raises for an unreadable file
    monkeypatch.setattr(os, "access", real_access)
    with pytest.raises(ModelNotFoundError, match="No such file or directory"):
        with loading_errors(source, "the model"):
            raise FileNotFoundError(2, "No such file or directory")


def test_cli_console_does_not_hard_wrap_piped_output(capsys):
    from peftkit.cli import _console

    _console().print("word " * 40 + "end")
    assert capsys.readouterr().out == "word " * 40 + "end\n"


def test_chat_tools_flag_refuses_empty_files_and_names_the_flag(tmp_path):
    from peftkit.data.formats import read_tools

    for name, text in (("empty.jsonl", ""), ("empty.json", "[]")):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match="holds no function schemas"):
            read_tools(str(tmp_path / name))
    for path in (tmp_path / "missing.json", tmp_path):
        with pytest.raises(DataError) as info:
            read_tools(str(path))
        assert str(info.value).startswith(f"--tools {path}") and "recipe" not in str(info.value)
    (tmp_path / "tools.json").write_text('[{"type": "function", "function": {"name": "f", "parameters": {}}}]')
    assert read_tools(str(tmp_path / "tools.json"))[0]["function"]["name"] == "f"


def test_disk_full_during_train_is_one_line(monkeypatch, capsys):
    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 43200 vs 43092")

    monkeypatch.setattr("peftkit.train.launch.train_command", full)
    assert main(["train", "recipe.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no space left on device while writing") and err.count("\n") == 1
    assert "`peftkit train recipe.yaml --resume`" in err and "Traceback" not in err

    def safetensors_full(*args, **kwargs):
        from safetensors import SafetensorError

        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("peftkit.train.launch.train_command", safetensors_full)
    assert main(["train", "recipe.yaml"]) == 2 and "no space left on device" in capsys.readouterr().err

    def other(*args, **kwargs):
        raise RuntimeError("some other failure")

    monkeypatch.setattr("peftkit.train.launch.train_command", other)
    with pytest.raises(RuntimeError, match="some other failure"):
        main(["train", "recipe.yaml"])
    monkeypatch.setattr("peftkit.train.launch.train_command", full)
    assert main(["-v", "train", "recipe.yaml"]) == 2  # the traceback as well, the same message and status
    err = capsys.readouterr().err
    assert "unexpected pos" in err and "Traceback" in err and "error: no space left on device" in err


def test_readme_own_domain_lists_description():
    paragraph = (REPO / "README.md").read_text(encoding="utf-8").split("**Your own domain**", 1)[1].split("\n\n", 1)[0]
    assert "`description`" in paragraph


def test_a_qlora_runs_card_loads_the_adapter_on_its_quantized_base(tmp_path):
    """On the original weights a QLoRA adapter answers differently (docs/export.md): the run card's plain-peft snippet
    loads the base quantized as training did, and the snippet is valid Python."""
    from peftkit.config.schema import QuantizationConfig
    from peftkit.train.model_card import _plain_use

    card = "\n".join(_plain_use(tmp_path, "Be brief.", QuantizationConfig(bits=4)))
    snippet = card.split("```python\n")[1].split("```")[0]
    compile(snippet, "card", "exec")
    assert "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4'" in snippet
    assert 'from_pretrained("' + str(tmp_path / "adapter") + '", quantization_config=quantization)' in snippet
    assert "exact loading code" not in snippet
    kept = "\n".join(_plain_use(tmp_path, None, QuantizationConfig(bits=4, keep_modules=["v_proj"])))
    assert "--format adapter` writes the exact loading code" in kept
    assert "quantization" not in "\n".join(_plain_use(tmp_path, None, None))


def test_chat_system_empty_asks_without_a_system_prompt(monkeypatch):
    """`--system ''` is how to ask a model with no system prompt (e.g. to check a `contrast`-trained one)."""
    import types

    import peftkit.runs
    import peftkit.serve.chat

    run = types.SimpleNamespace(model=None, tokenizer=None,
                                recipe=types.SimpleNamespace(data=types.SimpleNamespace(system_prompt="recipe's"),
                                                             train=types.SimpleNamespace(num_threads=1, device="cpu")))
    seen = []
    monkeypatch.setattr(peftkit.runs, "read_run_recipe", lambda run_dir: run.recipe)
    monkeypatch.setattr(peftkit.runs, "require_chat_run", lambda *args: None)
    monkeypatch.setattr(peftkit.runs, "load_run", lambda *args, **kwargs: run)
    monkeypatch.setattr(peftkit.serve.chat, "chat", lambda *args, **kwargs: seen.append(kwargs["system_prompt"]))
    for flags in ([], ["--system", ""], ["--system", "Be brief."]):
        assert main(["chat", "RUN", "--prompt", "hi", *flags]) == 0
    assert seen == ["recipe's", None, "Be brief."]


def test_an_invalid_node_count_is_one_problem():
    from peftkit.train.launch import LaunchOptions

    assert LaunchOptions(nnodes=0).problems() == ["--nnodes must be at least 1, got 0"]


def test_prefix_projection_runs_resume_and_early_stop_from_their_checkpoints(tiny_recipe):
    """peft checkpoints a projected prefix in its inference form, which cannot be trained from: a stopped run of
    `quickstart-prefix.yaml` was told its resume command and then refused, and early stopping was refused. Each
    checkpoint now carries the trained encoder: a resumed run ends where an uninterrupted one does."""
    import copy

    from peftkit.config.validate import validate_recipe
    from peftkit.train.run import train
    from peftkit.train.signals import TrainingInterrupted
    from peftkit.train.trainer import PREFIX_ENCODER_FILE
    from tests.unit.test_interrupt_reports import SignalAt

    data = copy.deepcopy(tiny_recipe)
    data["adapter"] = {"method": "prefix_tuning", "num_virtual_tokens": 4, "prefix_projection": True}
    data["train"] = {**data["train"], "max_steps": 6, "save_steps": 2, "eval_steps": 2, "lr": 1e-2}
    data["eval"] = {"before": False}
    reference = train(recipe_from_dict({**data, "output_dir": str(Path(data["output_dir"]).parent / "whole")}))
    recipe = recipe_from_dict(data)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(recipe, extra_callbacks=[SignalAt(3)])
    kept = stopped.value.run_dir / "checkpoints" / f"checkpoint-{stopped.value.step}" / PREFIX_ENCODER_FILE
    encoder = kept.read_bytes()
    kept.unlink()  # as an earlier peftkit saved it: only the projected prefix, which cannot be trained from
    with pytest.raises(RunDirError, match=r"saved by an earlier peftkit.*start the run again with --force"):
        train(recipe, resume=True)
    kept.write_bytes(encoder)
    resumed = train(recipe, resume=True)
    assert resumed.summary["eval_loss_after"] == pytest.approx(reference.summary["eval_loss_after"], rel=1e-4)
    assert resumed.summary["train_loss"] == pytest.approx(reference.summary["train_loss"], rel=1e-4)

    data["train"] = {**data["train"], "early_stopping_patience": 1, "lr": 0.3}  # diverges: the best is an early one
    early = train(recipe_from_dict({**data, "output_dir": str(Path(data["output_dir"]).parent / "early")}))  # was refused
    evals = {r["step"]: r["eval_loss"] for r in map(json.loads, (early.run_dir / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in r and r["step"] > 0}
    best = min(evals, key=evals.get)
    assert early.summary["weights_from_step"] == best and best < max(evals)
    assert early.summary["eval_loss_after"] == pytest.approx(evals[best], rel=1e-4)  # the best checkpoint's encoder
    data["deepspeed"] = "zero2"  # DeepSpeed's checkpoints do not carry peftkit's copy of the encoder: still refused
    with pytest.raises(ConfigError, match="under DeepSpeed.*early stopping cannot load its best checkpoint"):
        validate_recipe(recipe_from_dict(data), check_model=False)


def test_a_warm_up_over_every_step_is_dropped_and_a_replaced_save_interval_is_said(tiny_recipe, tmp_path, caplog):
    """A 1-step run's only step would be a warm-up step at learning rate 0: the saved adapter would be untrained."""
    import copy

    import torch

    from peftkit.train.run import training_arguments
    from peftkit.train.trainer import drop_warmup_covering_all_steps

    def arguments(**train):
        data = copy.deepcopy(tiny_recipe)
        data["train"] = {**data["train"], **train}
        return training_arguments(recipe_from_dict(data), tmp_path, "cpu", torch.float32, has_eval=True)

    with caplog.at_level(logging.WARNING):
        one_step = arguments(max_steps=1, warmup_ratio=0.05)
        drop_warmup_covering_all_steps(one_step, 1)  # as both trainers' create_scheduler call it
        assert one_step.warmup_steps == 0 and "all 1 steps warm-up steps" in caplog.text
        caplog.clear()
        forty_steps = arguments(max_steps=40, warmup_ratio=0.05)
        drop_warmup_covering_all_steps(forty_steps, 40)
        assert forty_steps.warmup_steps == 0.05 and not caplog.text
        args = arguments(max_steps=12, eval_steps=2, save_steps=3, early_stopping_patience=1)
        assert args.save_steps == 2 and "train.save_steps 3 is replaced by train.eval_steps 2" in caplog.text


def test_a_relative_base_is_recorded_as_an_absolute_path(export_recipe, llama64_dir, tmp_path, monkeypatch):
    """`merge --base DIR` wrote `base_model: DIR` into the card: valid only where the command ran."""
    from peftkit.export.merge import resolve_run

    run = make_run(tmp_path / "run", export_recipe, __import__("peft").LoraConfig(r=4, target_modules=["q_proj"]))
    monkeypatch.chdir(llama64_dir.parent)
    assert resolve_run(run, base=llama64_dir.name).model_cfg.name == str(llama64_dir.resolve())


def test_the_run_cards_plain_peft_snippet_runs_as_written(tiny_recipe, tmp_path):
    """The card's Python, executed: on transformers 5 apply_chat_template returns a dict-like batch."""
    import copy

    from peftkit.train.run import train

    data = copy.deepcopy(tiny_recipe)
    data["data"]["system_prompt"] = "you are a helpful assistant."
    data["train"] = {**data["train"], "max_steps": 1}
    data["eval"] = {"before": False}
    run_dir = train(recipe_from_dict(data)).run_dir
    card = (run_dir / "README.md").read_text()
    snippet = card.split("or with plain peft:")[1].split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(snippet.replace("max_new_tokens=200", "max_new_tokens=3"), "card", "exec"), namespace)  # noqa: S102
    assert namespace["reply"].ndim == 1 and len(namespace["reply"]) <= 3


def test_an_os_error_keeps_its_message_and_exit_status_under_verbose(monkeypatch, capsys):
    """-v printed a bare traceback instead, and exited 1 where the same error exits 2 without it."""
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/data/train.jsonl")

    monkeypatch.setattr("peftkit.train.launch.train_command", denied)
    assert main(["train", "recipe.yaml"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: Permission denied (/data/train.jsonl); check its permissions, or use a place you can write "
                   "to (-v shows the traceback)\n")
    assert main(["train", "recipe.yaml", "-v"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("check its permissions, or use a place you can write to")


def test_a_full_temporary_folder_is_named_with_tmpdir(monkeypatch, capsys, tmp_path):
    """A GGUF export saves the tokenizer into a temporary folder: a full TMPDIR was reported as a full checkpoint
    disk, sending the user to free space on the wrong disk."""
    import shutil
    from collections import namedtuple

    def full(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("peftkit.train.launch.train_command", full)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 0))
    assert main(["train", "recipe.yaml"]) == 2
    err = capsys.readouterr().err
    assert f"while writing a temporary file in {tmp_path}; free space in {tmp_path} or set TMPDIR" in err
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 10**12))
    assert main(["train", "recipe.yaml"]) == 2
    assert "TMPDIR" not in capsys.readouterr().err


@pytest.mark.parametrize("command", [["chat", "~/runs/r", "--prompt", "hi"], ["merge", "~/runs/r"],
                                     ["export", "~/runs/r", "--format", "adapter"], ["eval", "~/runs/r"]])
def test_a_tilde_the_shell_left_in_a_run_dir_is_expanded_by_every_command(command, monkeypatch, capsys, tmp_path):
    """`eval` and `validate` expanded a quoted `~/runs/r`; `chat`, `merge` and `export` said it does not exist."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(command) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/runs/r" in err and "~" not in err, err


def test_files_people_read_keep_their_text_as_written(tiny_recipe, tmp_path):
    """heldout.jsonl, summary.json and eval.json stored Chinese / Arabic / Russian as \\u escapes."""
    from peftkit.train.run import train
    from peftkit.utils.readable_json import readable_json

    assert readable_json({"q": "星光书店 ٣"}) == '{"q": "星光书店 ٣"}'
    lone = readable_json({"q": "\ud800"})  # a `\ud800` escape in a data file: UTF-8 cannot hold it, the escape stays
    assert lone == '{"q": "\\ud800"}' and json.loads(lone) == {"q": "\ud800"}
    from peftkit.evaluate.run_eval import evaluate_run
    from peftkit.train.run_dir import BEFORE_FILE

    heldout = write_jsonl(tmp_path / "q.jsonl", [{"question": "书店几点开门？", "key_fact": "九点"}])
    recipe = recipe_from_dict({**tiny_recipe, "name": "星光书店", "train": {**tiny_recipe["train"], "max_steps": 1},
                               "data": {**tiny_recipe["data"], "heldout": str(heldout)}})
    run_dir = train(recipe).run_dir
    evaluate_run(run_dir, general=str(heldout))
    for name, text in (("summary.json", "星光书店"), ("heldout.jsonl", "书店几点开门"), ("eval.json", "书店几点开门"),
                       (BEFORE_FILE, "书店几点开门")):
        written = (run_dir / name).read_text(encoding="utf-8")
        assert text in written and "\\u" not in written, name


def test_an_exports_json_reports_keep_their_text_as_written(tmp_path):
    """verification.json and the export's other reports are read by people too."""
    from peftkit.export.common import write_json

    write_json(tmp_path / "verification.json", {"prompt": "Когда открыто?", "path": tmp_path / "东京"})
    written = (tmp_path / "verification.json").read_text(encoding="utf-8")
    assert "Когда открыто?" in written and "东京" in written and "\\u" not in written


def test_training_says_what_the_data_became_and_a_batch_larger_than_the_data(tiny_recipe, caplog):
    from peftkit.train.run import train

    recipe = {**tiny_recipe, "data": {**tiny_recipe["data"], "eval_fraction": 0},
              "train": {**tiny_recipe["train"], "epochs": 1, "batch_size": 64}, "eval": {"before": False}}
    with caplog.at_level(logging.INFO, logger="peftkit"):
        result = train(recipe_from_dict(recipe))
    summary = json.loads((Path(result.run_dir) / "summary.json").read_text())
    rows = summary["train_rows"]
    assert rows < 64 and summary["steps"] == 1
    assert f"Data: {rows} training rows (chat format" in caplog.text
    assert (f"The global batch (64 = batch_size x grad_accum x processes) is larger than the {rows} training rows: "
            f"every optimizer step trains on all {rows}") in caplog.text
