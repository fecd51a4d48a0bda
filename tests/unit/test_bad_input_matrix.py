"""Bad input: every case exits 2 with one clear message, no traceback, and writes nothing partial.

Each case builds a broken recipe/data/model situation on the tiny model and runs the CLI
in-process (`peftkit.cli.main`), asserting the exit code, the key phrase of the message (what is
wrong) and that the run directory is absent or complete.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from peftkit.cli import main

Case = Callable[[dict[str, Any], Path], list[str]]


def recipe_file(recipe: dict[str, Any], tmp: Path, text: str | None = None) -> str:
    path = tmp / "recipe.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(recipe))
    return str(path)


def with_train_lines(recipe: dict[str, Any], tmp: Path, lines: list[str] | bytes) -> list[str]:
    data = tmp / "bad.jsonl"
    data.write_bytes(lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode())
    recipe["data"]["train"] = str(data)
    return ["train", recipe_file(recipe, tmp)]


NO_KEY_FACT = json.dumps({"question": "q"})
GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


def msgs(*pairs: tuple[str, str]) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in pairs]})


CASES: dict[str, tuple[Case, str]] = {
    "yaml syntax error": (lambda r, t: ["train", recipe_file(r, t, "data:\n  train: a: b\n")], "YAML syntax error at line 2"),
    "unknown key": (lambda r, t: ["train", recipe_file(r, t), "train.learning_rate=1"], "did you mean `lr`"),
    "unknown section": (lambda r, t: ["train", recipe_file(r, t), "trainer.lr=1"], "unknown key `trainer`"),
    "wrong type": (lambda r, t: ["train", recipe_file(r, t), "train.batch_size=eight"], "train.batch_size"),
    "zero lr": (lambda r, t: ["train", recipe_file(r, t), "train.lr=0"], "train.lr"),
    "negative epochs": (lambda r, t: ["train", recipe_file(r, t), "train.epochs=-1"], "train.epochs"),
    "zero rank": (lambda r, t: ["train", recipe_file(r, t), "adapter.r=0"], "adapter.r"),
    "dropout out of range": (lambda r, t: ["train", recipe_file(r, t), "adapter.dropout=1.5"], "adapter.dropout"),
    "unknown method": (lambda r, t: ["train", recipe_file(r, t), "adapter.method=loha2"], "choose one of"),
    "parameter of another method": (lambda r, t: ["train", recipe_file(r, t), "adapter.num_virtual_tokens=3"], "not a parameter of adapter method"),
    "bad override syntax": (lambda r, t: ["train", recipe_file(r, t), "train.lr"], "key.sub=value"),
    "recipe file missing": (lambda r, t: ["train", str(t / "nope.yaml")], "does not exist"),
    "recipe not a mapping": (lambda r, t: ["validate", recipe_file(r, t, "- 1\n- 2\n")], "mapping"),
    "missing data file": (lambda r, t: ["train", recipe_file(r, t), f"data.train={t / 'missing.jsonl'}"], "does not exist"),
    "empty dataset": (lambda r, t: with_train_lines(r, t, [""]), "contains no examples"),
    "jsonl line not json": (lambda r, t: with_train_lines(r, t, [GOOD, "{oops"]), "bad.jsonl:2"),
    "record without messages": (lambda r, t: with_train_lines(r, t, [GOOD, '{"prompt": "x"}']), "unrecognised record"),
    "no assistant turn": (lambda r, t: with_train_lines(r, t, [msgs(("user", "hi"))]), "no assistant turn"),
    "roles out of order": (lambda r, t: with_train_lines(r, t, [msgs(("assistant", "a"), ("user", "b"))]), "roles out of order"),
    "unknown role": (lambda r, t: with_train_lines(r, t, [msgs(("wizard", "a"), ("assistant", "b"))]), "unknown role"),
    "content not a string": (lambda r, t: with_train_lines(r, t, ['{"messages": [{"role": "user", "content": {"a": 3}}]}']), "must be a string"),
    "non-utf8 bytes": (lambda r, t: with_train_lines(r, t, b'{"text": "caf\xe9"}\n'), "not valid UTF-8"),
    "heldout without key_fact": (
        lambda r, t: ["train", recipe_file(r, t), "data.heldout=" + write(t / "h.jsonl", NO_KEY_FACT)],
        "key_fact",
    ),
    "model path missing": (lambda r, t: ["train", recipe_file(r, t), f"model.name={t / 'no-model'}"], "does not exist"),
    "hub id offline": (lambda r, t: ["train", recipe_file(r, t), "model.name=nobody/nothing-here"], "hf download"),
    "directory not a model": (lambda r, t: ["train", recipe_file(r, t), f"model.name={t}"], "no config.json"),
    "pickle-only model": (lambda r, t: ["train", recipe_file(r, t), f"model.name={pickle_model(t)}"], "allow_pickle"),
    "gguf of unsupported architecture": (lambda r, t: ["train", recipe_file(r, t), f"model.name={odd_gguf(t)}"], "cannot load"),
    "target modules match nothing": (lambda r, t: ["train", recipe_file(r, t), "adapter.target_modules=[attention]"], "matches no linear module"),
    "layers out of range": (lambda r, t: ["train", recipe_file(r, t), "adapter.layers=[0, 9]"], "out of range"),
    "chat template file missing": (lambda r, t: ["train", recipe_file(r, t), "model.chat_template=/no/template.jinja"], "chat_template"),
    "chat template file not jinja": (lambda r, t: ["validate", recipe_file(r, t), "--no-model", "model.chat_template="
                                     + write(t / "t.jinja", "{% for m in messages %}{{ m.content }")],
                                     "t.jinja is not a valid Jinja chat template (line 1: unexpected '}')"),
    "chat template unknown filter": (lambda r, t: ["train", recipe_file(r, t), "model.chat_template="
                                      + write(t / "t.jinja", "{{ messages | nosuchfilter }}")],
                                     "not a valid Jinja chat template (line 1: No filter named 'nosuchfilter'"),
    "read-only output location": (lambda r, t: ["train", recipe_file(r, t), "output_dir=/proc/peftkit/run"], "cannot write the run directory"),
    "resume without checkpoint": (lambda r, t: ["train", recipe_file(r, t), "--resume"], "no run to resume"),
    "chat on missing run": (lambda r, t: ["chat", str(t / "no-run")], "does not exist"),
    "chat on non-run directory": (lambda r, t: ["chat", str(t)], "not a peftkit run directory (no recipe.yaml); pass "
                                  "the output_dir of a `peftkit train` run"),
    "chat on a folder of runs": (lambda r, t: ["chat", write_run_recipe(t / "runs" / "a")],
                                 "runs is not a peftkit run directory (no recipe.yaml); it holds runs: pass one of them "
                                 "("),
}


def write_run_recipe(run: Path) -> str:
    """A folder `runs/` holding a run directory `runs/a`: the folder of runs is given, not a run."""
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text("data: {train: t.jsonl}\n")
    return str(run.parent)


def write(path: Path, text: str) -> str:
    path.write_text(text + "\n")
    return str(path)


def pickle_model(tmp: Path) -> Path:
    folder = tmp / "pickle-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "pytorch_model.bin").write_bytes(b"not really")
    return folder


def odd_gguf(tmp: Path) -> Path:
    import gguf

    path = tmp / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "made-up-arch")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_matrix_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tiny_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    build, expected = CASES[name]
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    recipe = json.loads(json.dumps(tiny_recipe))
    recipe["output_dir"] = str(tmp_path / "out")
    argv = build(recipe, case_dir)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err, err
    assert "Traceback" not in err
    assert err.startswith("error: "), "one clear message"
    run_dir = tmp_path / "out"
    assert not run_dir.exists() or (run_dir / "summary.json").is_file(), "no partial run directory"


def test_text_longer_than_max_seq_len_warns_and_trains(tiny_recipe, tmp_path, caplog):
    long = {"messages": [{"role": "user", "content": "one two three " * 40}, {"role": "assistant", "content": "four five"}]}
    fine = json.loads(GOOD)
    data = tmp_path / "long.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in [long, fine, fine, fine]) + "\n")
    recipe = {**tiny_recipe, "data": {**tiny_recipe["data"], "train": str(data), "max_seq_len": 24, "eval_fraction": 0},
              "train": {**tiny_recipe["train"], "max_steps": 1}, "eval": {"before": False}}
    assert main(["train", recipe_file(recipe, tmp_path)]) == 0
    assert any("truncated" in r.message or "no supervised tokens" in r.message for r in caplog.records)


def test_bitsandbytes_missing_is_reported(tiny_recipe, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    code = main(["validate", recipe_file(tiny_recipe, tmp_path), "quantization.bits=4"])
    assert code == 2
    assert "pip install bitsandbytes" in capsys.readouterr().err


def test_failed_run_leaves_existing_run_untouched(tiny_recipe, tmp_path, capsys):
    recipe = {**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 1}, "eval": {"before": False}}
    assert main(["train", recipe_file(recipe, tmp_path)]) == 0
    run_dir = Path(recipe["output_dir"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["heldout_accuracy_before"] is None and summary["eval_loss_before"] is not None  # eval.before: false
    before = sorted(p.name for p in run_dir.iterdir())
    assert main(["train", recipe_file(recipe, tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == before
    shutil.rmtree(run_dir)
