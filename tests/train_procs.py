"""Helpers for tests that run `peftkit train` in subprocesses (resume, signals, multi-process).

Slow steps come from a test-only `sitecustomize.py` put on PYTHONPATH: it wraps
`Trainer.training_step` with a sleep in every process that has PEFTKIT_TEST_STEP_DELAY set,
torchrun workers included, so a test can act between checkpoints without hooks in peftkit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import CHAT_RECORDS, write_jsonl

REPO = Path(__file__).resolve().parents[1]

SITECUSTOMIZE = '''
import os
_delay = float(os.environ.get("PEFTKIT_TEST_STEP_DELAY") or 0)
if _delay:
    import importlib.abc, sys, time

    class _PatchTrainer(importlib.abc.MetaPathFinder):
        """Wrap Trainer.training_step with a sleep once transformers.trainer is imported."""
        def find_spec(self, name, path=None, target=None):
            if name != "transformers.trainer":
                return None
            sys.meta_path.remove(self)
            import importlib.util
            spec = importlib.util.find_spec(name)
            loader = spec.loader
            original_exec = loader.exec_module
            def exec_module(module):
                original_exec(module)
                step = module.Trainer.training_step
                def slow_step(self, *args, **kwargs):
                    time.sleep(_delay)
                    return step(self, *args, **kwargs)
                module.Trainer.training_step = slow_step
            loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _PatchTrainer())
'''


def tiny_recipe_file(folder: Path, model_dir: Path, *, name: str = "recipe.yaml", train: dict[str, Any] | None = None,
                     extra: dict[str, Any] | None = None) -> Path:
    """A tiny-model recipe (no held-out generation, dropout 0) written to folder/name; data next to it."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "train.jsonl"
    if not data.exists():
        write_jsonl(data, CHAT_RECORDS * 4)
    recipe: dict[str, Any] = {
        "name": "tiny",
        "model": {"name": str(model_dir)},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": "train.jsonl", "eval_fraction": 0.25, "max_seq_len": 64},
        "train": {"max_steps": 12, "batch_size": 4, "lr": 5e-3, "logging_steps": 1, "seed": 0, "num_threads": 1,
                  "save_steps": 2, "warmup_ratio": 0.0, **(train or {})},
        "eval": {"max_new_tokens": 4, "batch_size": 4, "before": False},
        "output_dir": str(folder / "run"),
        **(extra or {}),
    }
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def subprocess_env(tmp: Path, step_delay: float = 0.0) -> dict[str, str]:
    custom = tmp / "sitecustomize-dir"
    custom.mkdir(parents=True, exist_ok=True)
    (custom / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(custom), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PEFTKIT_TEST_STEP_DELAY=str(step_delay),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def peftkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "peftkit.cli", *args]


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    return subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=str(log.parent))


def run(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> subprocess.CompletedProcess[bytes]:
    proc = start(cmd, env, log)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd)}\n{tail(log)}") from None
    return subprocess.CompletedProcess(cmd, code, log.read_bytes(), b"")


def tail(log: Path, chars: int = 6000) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-chars:] if log.exists() else ""


def kill_tree(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Signal a process and every descendant at once (torchrun puts workers in their own sessions)."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in family:
        try:
            member.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)


def wait_for(predicate: Any, proc: subprocess.Popen[bytes], log: Path, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{tail(log)}")
        time.sleep(0.05)
    kill_tree(proc)
    raise AssertionError(f"timed out waiting for {what}:\n{tail(log)}")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    from peftkit.train import checkpoints

    return [p for p in checkpoints.checkpoint_dirs(run_dir) if checkpoints.is_complete(p)]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from metrics.jsonl (fails on duplicate steps: resume must not log twice)."""
    found: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "loss" in record:
            assert record["step"] not in found, f"step {record['step']} logged twice"
            found[record["step"]] = record["loss"]
    return found


def adapter_tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))
