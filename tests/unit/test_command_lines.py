"""Command lines that messages give the user to copy name peftkit as it was started (`python -m peftkit` when it
was started that way) and quote their paths for a shell."""

from __future__ import annotations

import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

from peftkit.errors import ExportError
from peftkit.utils import command_name

PYTHON = "/opt/venvs/tuning/bin/python"


@pytest.fixture
def as_module(monkeypatch):
    """peftkit started as `/opt/venvs/tuning/bin/python -m peftkit`, as `peftkit/__main__.py` records it."""
    monkeypatch.setattr(command_name, "COMMAND", [PYTHON, "-m", "peftkit"])


def test_a_prompt_learning_merge_names_the_export_as_started_with_the_run_dir_quoted(as_module, tmp_path):
    from peftkit.export.compat import AdapterInfo, require_mergeable

    run_dir = tmp_path / "my runs" / "prefix"
    info = AdapterInfo(run_dir / "adapter", {"peft_type": "PREFIX_TUNING"})
    with pytest.raises(ExportError) as refused:
        require_mergeable(info, run_dir)
    said = str(refused.value)
    assert f"`{PYTHON} -m peftkit export {shlex.quote(str(run_dir))} --format adapter`" in said
    assert f"'{run_dir}'" in said and "`peftkit export" not in said


def test_a_gguf_lora_refusal_names_the_merged_export_as_started_with_the_run_dir_quoted(as_module, tmp_path):
    from peftkit.export.gguf_lora import check_head_and_embedding_loras

    run_dir = tmp_path / "run with spaces"
    from transformers import LlamaConfig

    run = SimpleNamespace(run_dir=run_dir, base_config=LlamaConfig(tie_word_embeddings=False))
    with pytest.raises(ExportError) as refused:  # an embedding LoRA on a layer llama.cpp has no LoRA for
        check_head_and_embedding_loras(run, {"model.wpe": "position_embd.weight"}, {"model.wpe"}, {})
    said = str(refused.value)
    assert f"use `{PYTHON} -m peftkit export '{run_dir}' --format gguf` (merged) instead" in said


def test_a_single_run_combination_names_merge_as_started(as_module):
    from peftkit.export.merge import combine_runs

    with pytest.raises(ExportError, match=r"\(use `/opt/venvs/tuning/bin/python -m peftkit merge RUN_DIR` for one\)"):
        combine_runs([Path("only-one")])


def test_the_command_is_restored_after_a_test_switched_it():
    assert command_name.COMMAND == ["peftkit"]
    assert command_name.command("export", "a b", "--format", "gguf") == "peftkit export 'a b' --format gguf"
