"""Two exports to one output folder: the second is refused at once, naming the first; a killed holder frees it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from tests.unit.export_fixtures import export_recipe, llama64_dir, make_run  # noqa: F401
from peftkit.cli import main
from peftkit.errors import ExportError
from peftkit.export import output_lock
from peftkit.export.adapter_export import export_adapter

torch.set_num_threads(1)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
ROOT = Path(__file__).resolve().parents[2]


def hold(out: Path) -> subprocess.Popen[str]:
    """Another process inside an export that has claimed `out`, until its stdin closes."""
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from peftkit.export import output_lock

        @output_lock.releases_claims
        def export():
            output_lock.claim(Path({str(out)!r}))
            print("held", flush=True)
            sys.stdin.read()

        export()
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize(("command", "loader"), [
    (["export", "--format", "adapter"], "peftkit.export.adapter_export.resolve_run"),
    (["merge"], "peftkit.export.hf.shipped_model"),  # claimed before loading, held through the write
])
def test_a_second_export_to_the_same_folder_is_refused_naming_the_first(export_recipe, tmp_path, capsys, monkeypatch,
                                                                        command, loader):
    run = make_run(tmp_path / "run", export_recipe, LORA)
    out = tmp_path / "exported"
    holder = hold(out)
    try:
        with monkeypatch.context() as patched:
            patched.setattr(loader, lambda *a, **k: pytest.fail("the run was loaded before the refusal"))
            code = main([command[0], str(run), *command[1:], "--out", str(out), "--no-verify"])
        err = " ".join(capsys.readouterr().err.split())
        assert code == 2
        assert f"another peftkit export is writing {out} now (pid {holder.pid}, since " in err
        assert "wait for it to end, or choose another --out" in err
        assert not out.exists()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not output_lock.lock_path(out).exists()  # the holder removed its lock file on the way out
    assert main([command[0], str(run), *command[1:], "--out", str(out), "--no-verify"]) == 0
    assert any(out.glob("*.safetensors")) and not output_lock.lock_path(out).exists() and not output_lock._held


def test_a_killed_holder_frees_the_folder(export_recipe, tmp_path):
    run = make_run(tmp_path / "run", export_recipe, LORA)
    out = tmp_path / "exported"
    holder = hold(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert output_lock.lock_path(out).exists()  # the file stays; the OS dropped its lock
    export_adapter(run, out, check=False)
    assert (out / "adapter_config.json").is_file() and not output_lock.lock_path(out).exists()


def test_a_failed_export_frees_its_folder_in_the_same_process(export_recipe, tmp_path):
    """A notebook that retries after an error must not find its own earlier attempt holding the folder."""
    run = make_run(tmp_path / "run", export_recipe, LORA)
    out = tmp_path / "exported"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="holds files peftkit did not write"):
        export_adapter(run, out, check=False)
    assert not output_lock._held and not output_lock.lock_path(out).exists()
    (out / "notes.txt").unlink()
    out.rmdir()
    holder = hold(out)  # another process can claim it now
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0


def test_exports_to_different_folders_do_not_wait_for_each_other(export_recipe, tmp_path):
    run = make_run(tmp_path / "run", export_recipe, LORA)
    holder = hold(tmp_path / "first")
    try:
        export_adapter(run, tmp_path / "second", check=False)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()


def test_a_failed_export_to_new_folders_leaves_none_of_them(export_recipe, tmp_path, monkeypatch):
    """The lock file goes next to the output, so claiming it creates the folders above; an export that then fails
    removes them again (a successful one keeps them, with the output)."""
    from peftkit.export import adapter_export

    run = make_run(tmp_path / "run", export_recipe, LORA)
    out = tmp_path / "new" / "deeper" / "exported"

    def fails(*args, **kwargs):
        raise ExportError("the base model could not be loaded")

    monkeypatch.setattr(adapter_export, "resolve_run", fails)
    with pytest.raises(ExportError, match="could not be loaded"):
        export_adapter(run, out, check=False)
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    export_adapter(run, out, check=False)
    assert (out / "adapter_config.json").is_file() and sorted(p.name for p in out.parent.iterdir()) == ["exported"]
