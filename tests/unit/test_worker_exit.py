"""A launched worker leaves with os._exit once its process group is torn down (gloo's C++ threads once aborted the
process in static destruction), but only after Python's exit handlers, logging and buffered output have run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import atexit, logging, os, sys
    import torch.distributed as dist
    from peftkit.train import launch

    marker, store = sys.argv[1], sys.argv[2]
    atexit.register(lambda: open(marker, "w").write("exit handlers ran"))
    import threading, time
    threading.Thread(target=lambda: (time.sleep(0.5), open(marker + ".thread", "w").write("joined"))).start()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    sys.stdout.write("buffered, no newline")
    launch.finish_process_group()
    launch.leave_worker_now(3)
    print("returned")
    """
)


def _run(tmp_path, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PEFTKIT_WORKER", "TORCHELASTIC_RUN_ID", "WORLD_SIZE")}
    env.update(env_extra)
    args = [sys.executable, "-c", SCRIPT, str(tmp_path / "marker"), str(tmp_path / "store")]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


def test_a_worker_leaves_at_once_after_its_exit_handlers_and_output(tmp_path):
    result = _run(tmp_path, {"PEFTKIT_WORKER": "1"})
    assert result.returncode == 3, result.stderr
    assert result.stdout == "buffered, no newline"
    assert (tmp_path / "marker").read_text() == "exit handlers ran"
    assert (tmp_path / "marker.thread").read_text() == "joined"  # a non-daemon thread finished its work first


def test_a_worker_whose_process_group_was_not_torn_down_returns(tmp_path):
    script = SCRIPT.replace("launch.finish_process_group()", "pass")
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE")}
    env["PEFTKIT_WORKER"] = "1"
    args = [sys.executable, "-c", script, str(tmp_path / "marker"), str(tmp_path / "store")]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "buffered, no newlinereturned\n"


def test_a_process_that_was_not_launched_returns_and_exits_normally(tmp_path):
    result = _run(tmp_path, {})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "buffered, no newlinereturned\n"
    assert (tmp_path / "marker").read_text() == "exit handlers ran"


def test_the_command_hands_its_exit_status_to_the_worker_exit(monkeypatch):
    from peftkit import cli
    from peftkit.train import launch

    left = []
    monkeypatch.setattr(launch, "leave_worker_now", left.append)
    assert cli.main(["train", "no-such-recipe.yaml"]) == 2
    assert left == [2]
