"""The CLI: clear one-paragraph errors, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

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


def test_validate_reports_unknown_target_modules(tiny_recipe, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    assert main(["validate", str(path), "adapter.target_modules=[attn]"]) == 2
    err = capsys.readouterr().err
    assert "matches no linear module" in err and "q_proj" in err


def test_set_flag_is_the_same_override_list(tiny_recipe, tmp_path, capsys):
    """`--set k=v` (the benchmarks' form) and positional `k=v` both reach the recipe, in order."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    assert main(["validate", str(path), "--set", "adapter.target_modules=[attn]"]) == 2
    assert "matches no linear module" in capsys.readouterr().err
    assert main(["validate", str(path), "adapter.target_modules=[attn]", "--set", "adapter.target_modules=[q_proj]"]) == 0


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


def test_models_lists_builtins(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "minilm-l6" in out
