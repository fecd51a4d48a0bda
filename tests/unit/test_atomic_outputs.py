"""Outputs peftkit writes: --force replaces only peftkit's own exports, killed writes leave no
full-size leftovers behind, and written folders/files are readable by other users as the umask says."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from tests.unit.export_fixtures import export_recipe, llama64_dir, make_run  # noqa: F401
from peftkit.cli import main
from peftkit.errors import ExportError, PeftkitError
from peftkit.export.adapter_export import export_adapter
from peftkit.export.common import EXPORT_MARKER, list_files, prepare_output
from peftkit.utils.atomic import atomic_directory, atomic_write_text

torch.set_num_threads(1)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


# --force replaces only what peftkit wrote


def test_force_never_deletes_a_folder_peftkit_did_not_write(export_recipe, tmp_path, capsys):
    run = make_run(tmp_path / "run", export_recipe, LORA)
    important = tmp_path / "important"
    important.mkdir()
    (important / "thesis.txt").write_text("precious")
    code = main(["export", str(run), "--format", "adapter", "--out", str(important), "--force", "--no-verify"])
    assert code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "never deletes a folder it did not write" in err and "--out" in err
    assert (important / "thesis.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_force_replaces_a_peftkit_export_and_an_empty_folder(export_recipe, tmp_path):
    run = make_run(tmp_path / "run", export_recipe, LORA)
    out = tmp_path / "out"
    out.mkdir()  # empty: nothing to lose
    export_adapter(run, out, force=True, check=False)
    assert (out / EXPORT_MARKER).is_file() and (out / "adapter_config.json").is_file()
    assert EXPORT_MARKER not in list_files(out)  # bookkeeping, not part of the export's listing
    with pytest.raises(ExportError, match="--force"):
        export_adapter(run, out, check=False)
    result = export_adapter(run, out, force=True, check=False)
    assert "adapter_model.safetensors" in result.files and (out / EXPORT_MARKER).is_file()
    # a file put there afterwards (e.g. a llama-quantize output next to a GGUF) is the user's: the marker lists
    # what the export wrote, and --force refuses the folder instead of deleting it
    (out / "mine-Q4_K_M.gguf").write_text("user's")
    with pytest.raises(ExportError, match=r"holds files peftkit did not write \(mine-Q4_K_M.gguf\)"):
        export_adapter(run, out, force=True, check=False)
    assert (out / "mine-Q4_K_M.gguf").read_text() == "user's"


@pytest.mark.parametrize("files", [
    {"verification.json": "{}", "model.safetensors": ""},  # any verified export
    {"adapter_config.json": "{}", "manifest.json": "{}"},  # adapter export, --no-verify
    {"Modelfile": "# Ollama Modelfile written by peftkit. Create ...\nFROM ./m-f16.gguf\n", "m-f16.gguf": ""},
    {"Modelfile": "# Ollama: base model + this LoRA. Create with: ...\nADAPTER ./a-lora-q8_0.gguf\n", "a-lora-q8_0.gguf": ""},
    {"README.md": "---\nbase_model: x\ntags:\n- peftkit\n- merged\n---\n# card\n", "model.safetensors": ""},
])
def test_exports_from_before_the_marker_are_recognised(tmp_path, files):
    out = tmp_path / "old-export"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    assert prepare_output(out, force=True, protected=[]) == out.resolve()


@pytest.mark.parametrize("files", [
    {"config.json": "{}", "model.safetensors": ""},  # a model downloaded from the hub
    {"Modelfile": "FROM ./mine.gguf\n", "mine.gguf": ""},  # the user's own Ollama folder
    {"README.md": "---\ntags:\n- llama\n---\npeftkit is mentioned here\n"},
    {"sub/verification.json": "{}"},  # only at the top level
])
def test_other_folders_are_refused_even_with_force(tmp_path, files):
    out = tmp_path / "theirs"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    with pytest.raises(ExportError, match="never deletes a folder it did not write") as info:
        prepare_output(out, force=True, protected=[])
    assert isinstance(info.value, PeftkitError)


def test_a_failed_write_keeps_the_previous_output(tmp_path):
    target = tmp_path / "merged"
    with atomic_directory(target) as tmp:
        (tmp / "model.safetensors").write_text("old")
    with pytest.raises(RuntimeError, match="verification failed"):
        with atomic_directory(target, replace=True) as tmp:
            (tmp / "model.safetensors").write_text("new")
            raise RuntimeError("verification failed")
    assert (target / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


# killed writes leave nothing behind for long


def test_temporary_names_carry_the_process_id(tmp_path):
    with atomic_directory(tmp_path / "merged") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".tmp-merged-{os.getpid()}-")


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path, kind):
    name = "merged" if kind == "directory" else "summary.json"
    dead, live = tmp_path / f".tmp-{name}-{dead_pid()}-abcd1234", tmp_path / f".tmp-{name}-{os.getpid()}-abcd1234"
    old_style, recent_old_style = tmp_path / f".tmp-{name}-k3j_x9q0", tmp_path / f".tmp-{name}-z8y7x6w5"
    other = tmp_path / f".tmp-other-{dead_pid()}-abcd1234"  # another target's: not ours to judge
    # the copy a replacement (--force) set aside and was killed deleting: a whole model, hidden
    set_aside, live_set_aside = tmp_path / f".old-{name}-{dead_pid()}", tmp_path / f".old-{name}-{os.getpid()}"
    for leftover in (dead, live, old_style, recent_old_style, other, set_aside, live_set_aside):
        leftover.mkdir()
        (leftover / "model.safetensors").write_text("a full-size copy")
    age(old_style, 2 * 86400)
    if kind == "directory":
        with atomic_directory(tmp_path / name) as tmp:
            (tmp / "config.json").write_text("{}")
    else:
        atomic_write_text(tmp_path / name, "{}")
    assert not dead.exists() and not old_style.exists() and not set_aside.exists()
    assert live.is_dir() and recent_old_style.is_dir() and other.is_dir() and live_set_aside.is_dir()
    assert (tmp_path / name).exists()


def test_an_unwritable_place_is_named_before_the_work_and_by_its_own_name(tmp_path, monkeypatch):
    """A read-only file system was called "permission denied" (export), found only after the whole evaluation
    (eval), and named by the hidden temporary file (atomic_write_text)."""
    import errno

    from peftkit.utils import atomic

    assert atomic.write_problem(tmp_path / "new" / "deeper" / "eval.json") is None
    (tmp_path / "afile").write_text("")
    assert atomic.write_problem(tmp_path / "afile" / "eval.json") == f"{tmp_path / 'afile'} is a file, not a folder"
    real_open = os.open

    def read_only(path, flags, *args):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(atomic.os, "open", read_only)
    assert atomic.write_problem(tmp_path / "eval.json") == f"{tmp_path} is not writable (read-only file system)"
    with pytest.raises(OSError) as info:
        atomic_write_text(tmp_path / "eval.json", "{}")
    assert info.value.filename == str(tmp_path / "eval.json")
    with pytest.raises(ExportError, match=r"cannot write the export to .*out: .* is not writable \(read-only file "
                                          r"system\); choose another --out"):
        prepare_output(tmp_path / "out", force=False, protected=[])


def test_eval_names_an_unwritable_report_before_loading_anything(tmp_path, monkeypatch):
    from peftkit.evaluate import run_eval

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(run_eval, "read_run_recipe", lambda run_dir: SimpleRecipe())
    monkeypatch.setattr(run_eval, "require_chat_run", lambda *a: None)
    monkeypatch.setattr(run_eval, "load_run", lambda *a, **k: pytest.fail("loaded the run before checking --out"))
    (tmp_path / "afile").write_text("")
    with pytest.raises(PeftkitError, match=r"cannot write the report to .*afile/sub.json: .*afile is a file, not a "
                                           r"folder; pass --out FILE in a folder you can write"):
        run_eval.evaluate_run(run, out=str(tmp_path / "afile" / "sub.json"))


class SimpleRecipe:
    """What evaluate_run reads of a recipe before it checks where the report goes."""


# written outputs follow the umask, like any other file


def test_written_folders_and_files_follow_the_umask(tmp_path):
    import torch
    from safetensors.torch import save_file

    with umask(0o022):
        with atomic_directory(tmp_path / "merged") as tmp:
            (tmp / "config.json").write_text("{}")
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors itself writes 0600
        atomic_write_text(tmp_path / "merged" / "README.md", "card")
    assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "merged" / "config.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "merged" / "model.safetensors").stat().st_mode) == 0o644, "a server can read it"
    assert stat.S_IMODE((tmp_path / "merged" / "README.md").stat().st_mode) == 0o644
    with umask(0o077):
        with atomic_directory(tmp_path / "private") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        atomic_write_text(tmp_path / "secret.txt", "x")
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "private" / "model.safetensors").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "secret.txt").stat().st_mode) == 0o600


def test_force_clears_what_killed_writers_left_in_a_run_folder(tmp_path):
    """`train --force` keeps hidden files (the run marker) but not a killed merge's full model copy."""
    import os
    import subprocess
    import sys

    from peftkit.train.run_dir import clear_run_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    run = tmp_path / "run"
    for name in [f".tmp-merged-{dead_pid}-0123abcd", f".old-gguf-{dead_pid}", f".tmp-merged-{os.getpid()}-0123abcd"]:
        (run / name).mkdir(parents=True)
        (run / name / "model.safetensors").write_text("copy")
    (run / ".peftkit-run").write_text("marker")
    (run / "adapter").mkdir()
    clear_run_dir(run)
    assert sorted(p.name for p in run.iterdir()) == [".peftkit-run", f".tmp-merged-{os.getpid()}-0123abcd"]


def test_an_output_another_process_wrote_meanwhile_is_kept_and_said(tmp_path, capsys, monkeypatch):
    """Two exports of one run at once: the slower one did all the work, then said "already exists; check the path
    and free space"."""
    target = tmp_path / "gguf"
    with pytest.raises(FileExistsError) as info:
        with atomic_directory(target) as tmp:
            (tmp / "mine.txt").write_text("mine")
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")
    assert "written meanwhile by another process" in str(info.value)
    assert [p.name for p in target.iterdir()] == ["theirs.txt"] and [p.name for p in tmp_path.iterdir()] == ["gguf"]

    def export(*args, **kwargs):
        raise info.value

    monkeypatch.setattr("peftkit.cli.build_parser", _parser_running(export))
    assert main(["anything"]) == 2
    err = capsys.readouterr().err
    assert f"written meanwhile by another process, so this result was not kept ({target}); use it, or run" in err
    assert "free space" not in err


def _parser_running(func):
    import argparse

    def build():
        parser = argparse.ArgumentParser()
        parser.add_argument("name")
        parser.add_argument("-v", "--verbose", action="store_true")
        parser.set_defaults(func=func)
        return parser

    return build
