"""Merge/export safety: --force never deletes a folder that merely looks like an export, an unwritable or full
output and a moved base are one clear error, and a killed export leaves no verification child or folder behind."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from tests.unit.export_fixtures import export_recipe, llama64_dir, make_run  # noqa: F401
from peftkit.cli import main
from peftkit.errors import ExportError
from peftkit.export import verify
from peftkit.export.common import disk_full_as_error, prepare_output
from peftkit.utils import atomic

torch.set_num_threads(1)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
README = "---\nbase_model: x\ntags:\n- peftkit\n- merged\n---\n# card\n"


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def err_text(capsys: pytest.CaptureFixture[str]) -> str:
    return " ".join(capsys.readouterr().err.split())


# 1. --force: an export's sign next to the user's own files is not an export


def test_force_keeps_a_folder_holding_verification_json_and_other_files(export_recipe, tmp_path, capsys):
    run = make_run(tmp_path / "run", export_recipe, LORA)
    proj = tmp_path / "proj2"
    (proj / "src").mkdir(parents=True)
    (proj / "verification.json").write_text('{"ok": true}')
    (proj / "src" / "thesis.tex").write_text("precious")
    code = main(["export", str(run), "--format", "adapter", "--out", str(proj), "--force", "--no-verify"])
    assert code == 2
    err = err_text(capsys)
    assert "peftkit did not write (src)" in err and "never deletes a folder it did not write" in err
    assert (proj / "src" / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in proj.iterdir()) == ["src", "verification.json"]


@pytest.mark.parametrize("files", [
    {"verification.json": "{}", "model.safetensors": "", "notes.txt": "mine"},
    {"adapter_config.json": "{}", "manifest.json": "{}", "thesis.tex": "mine"},
    {"Modelfile": "# Ollama Modelfile written by peftkit. Create ...\nFROM ./m.gguf\n", "m.gguf": "", "x.py": ""},
    {"README.md": README, "model.safetensors": "", "data/train.jsonl": "{}"},
    {"verification.json": "{}", "m.gguf": "", "config.json": "{}"},  # names of two kinds: neither export
])
def test_older_export_signs_with_foreign_files_are_refused(tmp_path, files):
    out = tmp_path / "theirs"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    with pytest.raises(ExportError, match="never deletes a folder it did not write"):
        prepare_output(out, force=True, protected=[])
    assert all((out / name).is_file() for name in files)


def test_an_older_complete_export_is_still_replaced(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    for name in ("verification.json", "README.md", "config.json", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json"):
        (out / name).write_text("{}")
    assert prepare_output(out, force=True, protected=[]) == out.resolve()


# 2. an output that cannot be written fails before any model loads, naming the output


def _no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr("peftkit.export.hf.shipped_model", fail)
    monkeypatch.setattr("peftkit.export.adapter_export.resolve_run", fail)


def test_unwritable_output_folder_fails_before_loading(export_recipe, tmp_path, capsys, monkeypatch):
    run = make_run(tmp_path / "run", export_recipe, LORA)
    real_open = os.open
    denied = run.resolve()  # the default output goes inside the run; root can write anywhere, so deny it here

    def deny(path, flags, *args):
        if flags & os.O_CREAT and Path(path).parent == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(atomic.os, "open", deny)
    _no_model_loads(monkeypatch)
    for argv in (["merge", str(run)], ["export", str(run), "--format", "adapter"]):
        assert main([*argv, "--no-verify"]) == 2
        err = err_text(capsys)
        assert f"cannot write the export to {denied}/" in err and "not writable (permission denied)" in err
        assert "--out" in err
        assert ".tmp-" not in err


def test_output_under_a_file_fails_before_loading(export_recipe, tmp_path, capsys, monkeypatch):
    run = make_run(tmp_path / "run", export_recipe, LORA)
    (tmp_path / "afile").write_text("x")
    _no_model_loads(monkeypatch)
    assert main(["merge", str(run), "--out", str(tmp_path / "afile" / "sub" / "merged"), "--no-verify"]) == 2
    err = err_text(capsys)
    assert f"{tmp_path / 'afile'} is a file, not a folder" in err and "--out" in err


# 3. a moved base: the error names --base


def test_moved_base_error_names_the_base_option(export_recipe, llama64_dir, tmp_path, capsys):
    base = shutil.copytree(llama64_dir, tmp_path / "base")
    run = make_run(tmp_path / "run", export_recipe, LORA, model_dir=base)
    base.rename(tmp_path / "moved")
    for argv in (["merge", str(run)], ["export", str(run), "--format", "adapter"]):
        assert main([*argv, "--no-verify"]) == 2
        err = err_text(capsys)
        assert "does not exist" in err and "--base PATH" in err
    assert main(["merge", str(run), "--no-verify", "--base", str(tmp_path / "moved")]) == 0


def test_full_run_exports_without_its_base_and_ignores_base_option(export_recipe, llama64_dir, tmp_path, capsys,
                                                                  caplog):
    """A full / partial run's model holds every weight: the base it started from may be gone (merge and GGUF export
    used to refuse with "put the base model back"), and `--base` has nothing to do for it (it was resolved, then
    ignored in silence)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.config import recipe_from_dict, recipe_to_yaml

    base = shutil.copytree(llama64_dir, tmp_path / "base")
    run = tmp_path / "full"
    run.mkdir()
    data = {**export_recipe, "model": {"name": str(base)}, "adapter": {"method": "full"}, "output_dir": str(run)}
    (run / "recipe.yaml").write_text(recipe_to_yaml(recipe_from_dict(data)))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(run / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.05)  # "trained"
    model.save_pretrained(run / "model")
    shutil.rmtree(base)
    with caplog.at_level("WARNING", logger="peftkit.export.merge"):
        assert main(["merge", str(run), "--base", str(tmp_path / "elsewhere")]) == 0, err_text(capsys)
    assert f"--base {tmp_path / 'elsewhere'} is not used" in caplog.text and "holds every weight" in caplog.text
    assert f"{base}, the base model this run was trained from, is not available here" in caplog.text
    probe = torch.tensor([[5, 17, 33, 2]])
    merged = AutoModelForCausalLM.from_pretrained(str(run / "merged"), dtype=torch.float32)
    with torch.no_grad():
        assert (merged(input_ids=probe).logits - model(input_ids=probe).logits).abs().max() < 1e-5
    assert main(["export", str(run), "--format", "adapter"]) == 2  # no adapter: what ships it instead
    assert f"is the model itself: ship it with `peftkit merge {run}`" in err_text(capsys)
    assert main(["export", str(run), "--format", "gguf", "--gguf-type", "f32", "--no-verify"]) == 0, err_text(capsys)
    # a second type: the default folder holds the first, so the message names a folder that keeps both
    assert main(["export", str(run), "--format", "gguf", "--gguf-type", "q8_0", "--no-verify"]) == 2
    said = err_text(capsys)
    assert f"--out {run / 'gguf-q8_0'}" in said and "holds an earlier GGUF export (" in said and "-f32.gguf" in said
    assert main(["export", str(run), "--format", "gguf", "--gguf-type", "q8_0", "--no-verify",
                 "--out", str(run / "gguf-q8_0")]) == 0, err_text(capsys)
    assert main(["export", str(run), "--format", "gguf", "--gguf-type", "f32", "--no-verify"]) == 2
    assert "already exists; pass --force" in err_text(capsys)


# 4. a killed export: its verification child dies with it, its reference folder is removed by the next run


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")  # a zombie no one reaps (a container's pid 1 may not) is dead too


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_verification_child_dies_with_a_killed_parent(tmp_path):
    child_pid = tmp_path / "child.pid"
    fake_python = tmp_path / "fake-python"  # stands in for `python -m peftkit.export.verify`: records its pid, waits
    fake_python.write_text(f"#!/bin/sh\necho $$ > {child_pid}\nexec sleep 60\n")
    fake_python.chmod(0o755)
    script = textwrap.dedent(f"""
        import sys, torch
        from peftkit.export import verify
        reference = verify.Reference([[{{"role": "user", "content": "hi"}}]], ["hi"], [[1]], [[2]],
                                     [torch.zeros(2, 4)], [], "test")
        sys.executable = {str(fake_python)!r}
        verify.run_child("hf", {str(tmp_path)!r}, reference)
    """)
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env)
    pid = None
    try:
        for _ in range(600):
            if child_pid.is_file() and child_pid.read_text().strip():
                pid = int(child_pid.read_text())
                break
            time.sleep(0.05)
        assert pid is not None, "the verification child did not start"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 5
        while not _gone(pid) and time.time() < deadline:
            time.sleep(0.05)
        assert _gone(pid), "the verification child outlived its killed parent"
    finally:
        parent.kill()
        if pid is not None and not _gone(pid):
            os.kill(pid, signal.SIGKILL)
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith("peftkit-verify-")]
    assert left == [f"peftkit-verify-{parent.pid}-" + left[0].rsplit("-", 1)[1]]


def test_stale_verification_folders_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead, live = tmp_path / f"peftkit-verify-{dead_pid()}-abcd_123", tmp_path / f"peftkit-verify-{os.getpid()}-abcd_123"
    old, recent_old = tmp_path / "peftkit-verify-k3j_x9q0", tmp_path / "peftkit-verify-z8y7x6w5"
    for folder in (dead, live, old, recent_old):
        (folder / "reference").mkdir(parents=True)
    then = time.time() - 2 * 86400
    os.utime(old, (then, then))
    verify.remove_stale_verify_folders()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, recent_old.name])


# 5. a full disk: one error naming the output, no traceback


def _safetensor_error() -> Exception:
    from safetensors import SafetensorError

    return SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')


@pytest.mark.parametrize("make", [
    _safetensor_error,
    lambda: OSError(errno.ENOSPC, "No space left on device"),
    lambda: OSError("2048 requested and 368 written"),  # numpy tofile, as gguf-py writes tensors
    lambda: RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"),
])
def test_disk_full_is_one_error_naming_the_folder(tmp_path, make):
    exc = make()
    if isinstance(exc, RuntimeError) and "enforce" in str(exc):  # torch.save: the errno is in the chained error
        try:
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise exc
        except RuntimeError as chained:
            exc = chained
    with pytest.raises(ExportError, match=f"no space left on device while writing {tmp_path}: .*--out"):
        with disk_full_as_error(tmp_path):
            raise exc


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(OSError, match="Permission denied"):
        with disk_full_as_error(tmp_path):
            raise OSError(errno.EACCES, "Permission denied")


@pytest.mark.parametrize("fmt", ["hf", "adapter", "gguf"])
def test_disk_full_while_exporting(export_recipe, tmp_path, capsys, monkeypatch, fmt):
    run = make_run(tmp_path / "run", export_recipe, LORA)

    def full(*args, **kwargs):
        raise _safetensor_error() if fmt != "gguf" else OSError("2048 requested and 368 written")

    target = {"hf": "peftkit.export.hf.save_model_dir", "adapter": "peftkit.export.adapter_export.save_tokenizer",
              "gguf": "peftkit.export.gguf_writer.write_model_gguf"}[fmt]
    monkeypatch.setattr(target, full)
    out = tmp_path / "out"
    assert main(["export", str(run), "--format", fmt, "--out", str(out), "--no-verify"]) == 2
    err = err_text(capsys)
    assert f"error: no space left on device while writing {out}" in err and "Traceback" not in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


@pytest.mark.parametrize(("fmt", "file_type", "pattern"), [("hf", "float16", "model*.safetensors"),
                                                           ("gguf", "q8_0", "*.gguf"), ("gguf", "q4_0", "*.gguf")])
def test_export_too_big_for_the_disk_is_refused_before_writing(export_recipe, tmp_path, capsys, monkeypatch, fmt,
                                                              file_type, pattern):
    from collections import namedtuple

    from peftkit.export import common

    run = make_run(tmp_path / "run", export_recipe, LORA)
    type_option = ["--dtype", file_type] if fmt == "hf" else ["--gguf-type", file_type]
    needed: list[float] = []
    room = common.weights_file_bytes
    monkeypatch.setattr(common, "weights_file_bytes", lambda model, kind: needed.append(room(model, kind)) or needed[-1])
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("Usage", "total used free")(1, 1, 50_000))
    out = tmp_path / "out"
    assert main(["export", str(run), "--format", fmt, "--out", str(out), "--no-verify", *type_option]) == 2
    err = err_text(capsys)
    what = "merged model" if fmt == "hf" else "GGUF file"
    assert f"error: not enough free space for the {what} in {tmp_path}: it takes about " in err
    assert f"({file_type}), and 50.0 KB is free; free some space there, or choose another --out" in err
    assert not out.exists() and not [p.name for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".lock-"))]
    monkeypatch.setattr(shutil, "disk_usage", real)
    assert main(["export", str(run), "--format", fmt, "--out", str(out), "--no-verify", *type_option]) == 0
    written = sum(p.stat().st_size for p in out.glob(pattern))
    # the weights' size: the file's, less its headers and the GGUF's tokenizer metadata (never more, so a disk
    # the estimate refuses could not have held the file)
    assert 0.85 * written <= needed[-1] <= written
