"""Thread counts on a shared CPU: what the user set is kept, otherwise the cores free now (a tester measured training
on both cores of a 2-core machine next to another job at 10x the time of training on the free one)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from peftkit.config import recipe_from_dict
from peftkit.utils import threads as threads_module
from peftkit.utils.threads import CpuLoad, choose_threads, omp_threads, other_runnable_tasks, usable_cpus


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _machine(monkeypatch, *, cores: int, load: float, others: int | None, usable: int | None = None) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(threads_module, "usable_cpus", lambda: usable or cores)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(threads_module, "other_runnable_tasks", lambda: others)


def test_omp_num_threads_counts_only_when_it_is_a_count(monkeypatch):
    for value, expected in [("3", 3), ("4,2", 4), (" 2 ", 2), ("0", None), ("-1", None), ("abc", None), ("", None)]:
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert omp_threads() == expected, value  # OpenMP ignores an invalid value: it is no setting


def test_usable_cpus_follow_the_affinity_mask_and_the_cgroup_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(threads_module, "cgroup_cpu_limit", lambda: None)
    assert usable_cpus() == 4
    monkeypatch.setattr(threads_module, "cgroup_cpu_limit", lambda: 2)  # docker --cpus=1.5 rounds up to 2
    assert usable_cpus() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5}, raising=False)  # taskset -c 5
    assert usable_cpus() == 1


def test_the_cgroup_quota_is_read_from_this_process_s_cgroup_and_its_parents(tmp_path):
    from peftkit.utils.threads import cgroup_cpu_limit

    own = tmp_path / "self_cgroup"
    own.write_text("0::/pods/pod1/job\n")
    root = tmp_path / "cgroup"
    (root / "pods" / "pod1" / "job").mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(root, own) is None  # no quota anywhere
    (root / "pods" / "pod1" / "cpu.max").write_text("150000 100000\n")  # the pod's limit, 1.5 CPUs, on a parent
    (root / "pods" / "pod1" / "job" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(root, own) == 2
    (root / "pods" / "pod1" / "job" / "cpu.max").write_text("50000 100000\n")  # the smallest wins
    assert cgroup_cpu_limit(root, own) == 1
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(v1, tmp_path / "missing") is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    assert cgroup_cpu_limit(v1, tmp_path / "missing") == 3


def test_without_a_setting_a_busy_cpu_gets_the_cores_that_are_free(monkeypatch, caplog):
    _machine(monkeypatch, cores=4, load=5.0, others=3)
    with caplog.at_level(logging.WARNING):
        assert choose_threads(None, "training", "train.num_threads") == 1
    assert torch.get_num_threads() == 1
    assert "training on 1 of the 4 cores" in caplog.text and "set train.num_threads" in caplog.text
    assert "3 kept busy by other work now" in caplog.text
    _machine(monkeypatch, cores=2, load=6.0, others=9)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert choose_threads(None, "training", "train.num_threads") == 1  # at least one
    # not "9 kept busy" on 2 cores, nor "1 of the 2 cores, those free now"
    assert "load 6.0 on 2 cores, all of them kept busy by other work now" in caplog.text
    assert "training on 1 thread, as no core is free now" in caplog.text


def test_on_a_big_machine_the_busy_cores_are_counted_without_a_cliff(monkeypatch):
    """A fixed share of the cores as the threshold let 40 busy threads of 64 cores pass unseen, then cut to 17."""
    for load, others, expected in [(40.0, 40, 24), (47.9, 47, 17), (30.7, 47, 34), (3.0, 40, 61), (40.0, 3, 61)]:
        _machine(monkeypatch, cores=64, load=load, others=others)
        assert choose_threads(None, "training", "x") == expected, (load, others)


def test_a_load_left_over_from_the_last_run_is_not_a_busy_cpu(monkeypatch, caplog):
    """`make quickstart` chats right after training: the 1-minute load average is still high, nothing else runs."""
    _machine(monkeypatch, cores=2, load=2.0, others=0)
    with caplog.at_level(logging.WARNING):
        assert choose_threads(None, "chatting", "OMP_NUM_THREADS") == 2
    _machine(monkeypatch, cores=2, load=0.9, others=4)  # a moment's spike after a quiet minute
    with caplog.at_level(logging.WARNING):
        assert choose_threads(None, "chatting", "OMP_NUM_THREADS") == 2
    assert not caplog.records


def test_a_count_the_user_set_is_kept_and_warned_about_only_when_it_collides(monkeypatch, caplog):
    _machine(monkeypatch, cores=2, load=3.0, others=1)
    with caplog.at_level(logging.WARNING):
        assert choose_threads(2, "training", "train.num_threads") == 2
    assert "training on 2 threads next to other jobs" in caplog.text and "set train.num_threads" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert choose_threads(1, "training", "train.num_threads") == 1  # one thread beside one other job: fits
    assert not caplog.records
    _machine(monkeypatch, cores=2, load=3.0, others=2)
    with caplog.at_level(logging.WARNING):
        choose_threads(1, "training", "train.num_threads")
    assert "run it alone" in caplog.text and "train.num_threads" not in caplog.text


def test_the_load_is_not_looked_at_off_the_cpu_without_a_count_of_running_threads_or_inside_a_cpuset(monkeypatch,
                                                                                                       caplog):
    with caplog.at_level(logging.WARNING):
        _machine(monkeypatch, cores=2, load=9.0, others=5)
        assert choose_threads(None, "training", "x", on_cpu=False) == 2
        _machine(monkeypatch, cores=2, load=3.0, others=None)  # not Linux
        assert choose_threads(None, "training", "x") == 2
        # Confined to 2 of 64 host CPUs: the host's load says nothing of which are busy; its own 2 are used.
        _machine(monkeypatch, cores=64, load=60.0, others=60, usable=2)
        assert choose_threads(None, "training", "x") == 2
    assert not caplog.records


def test_a_cpu_launch_shares_the_free_cores_among_its_processes(monkeypatch, caplog):
    from peftkit.train.launch import cpu_threads_per_process

    _machine(monkeypatch, cores=8, load=2.0, others=2)
    with caplog.at_level(logging.WARNING):
        assert cpu_threads_per_process(2) == 3
    assert "each of the 2 processes trains on 3 threads, the cores free now" in caplog.text
    _machine(monkeypatch, cores=2, load=5.0, others=4)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert cpu_threads_per_process(2) == 1
    assert "all of them kept busy" in caplog.text and "trains on 1 thread, as no core is free now" in caplog.text
    _machine(monkeypatch, cores=8, load=0.0, others=0)
    assert cpu_threads_per_process(2) == 4 and cpu_threads_per_process(16) == 1


def test_a_launch_keeps_the_user_s_count_and_passes_its_own_only_through_the_environment(tiny_recipe, monkeypatch):
    from peftkit.train.launch import LaunchOptions, worker_environment, worker_threads

    _machine(monkeypatch, cores=16, load=0.0, others=0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    recipe = recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "num_threads": None}})
    assert worker_threads(recipe, "cpu", 2) == 8
    assert worker_threads(recipe, "cuda", 2) is None  # a GPU rank keeps torch's default
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert worker_threads(recipe, "cpu", 2) == 1  # what the user exported, not 8
    assert worker_threads(recipe_from_dict(tiny_recipe), "cpu", 2) == 1  # the recipe's train.num_threads
    env = worker_environment(recipe, "cpu", LaunchOptions(nproc=2), 8)
    assert env["OMP_NUM_THREADS"] == "8"


def test_the_running_count_comes_from_proc_loadavg():
    count = other_runnable_tasks(samples=3, interval=0.0)
    if os.path.exists("/proc/loadavg"):
        assert isinstance(count, int) and count >= 0
    else:
        assert count is None  # not Linux: the load is not looked at (tested above)
    assert CpuLoad(2.5, 2, 1).describe() == "load 2.5 on 2 cores, 1 kept busy by other work now"


def test_chat_and_eval_use_omp_num_threads_before_the_run_recipe(tiny_recipe, monkeypatch, caplog):
    from peftkit.cli import main
    from peftkit.train.run import train

    run = train(recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 1, "num_threads": 1},
                                  "eval": {"before": False}, "data": {**tiny_recipe["data"], "heldout": None}})).run_dir
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    _machine(monkeypatch, cores=2, load=4.0, others=2)
    from peftkit.utils import threads as threads_module

    chosen: list[int] = []
    choose = threads_module.choose_threads
    monkeypatch.setattr(threads_module, "choose_threads", lambda *a, **k: chosen.append(choose(*a, **k)) or chosen[-1])
    torch.set_num_threads(2)
    with caplog.at_level(logging.WARNING):
        assert main(["chat", str(run), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert chosen[-1] == 1  # the run's train.num_threads
    assert torch.get_num_threads() == 2  # cli.main from Python gives the caller's count back
    assert "chatting on 1 thread next to other jobs" in caplog.text and "run it alone" in caplog.text
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["eval", str(run), "--no-base", "--out", str(run / "e.json")]) == 0
    assert chosen[-1] == 2  # the user's OMP_NUM_THREADS wins over the recipe
    assert "evaluating on 2 threads" in caplog.text and "OMP_NUM_THREADS=1 peftkit" in caplog.text


def test_a_busy_cpu_is_said_when_the_model_loads_and_not_before_a_refusal(tiny_recipe, tmp_path, monkeypatch, capsys,
                                                                          caplog):
    """A trial's refusals each came after "The CPU is busy ...": two messages for one mistake, the first about
    work that never started."""
    import yaml

    from peftkit.cli import main

    _machine(monkeypatch, cores=2, load=3.0, others=2)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 1},
                                    "eval": {**tiny_recipe["eval"], "before": False}}))
    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]

    with caplog.at_level(logging.INFO):
        assert main(["train", str(path), "data.eval_fraction=0.99"]) == 2  # refused in its data, before the model loads
        assert "error:" in capsys.readouterr().err and not any("CPU is busy" in m for m in said())
        caplog.clear()
        assert main(["train", str(path)]) == 0
        busy = [i for i, m in enumerate(said()) if m.startswith("The CPU is busy")]
        loading = next(i for i, m in enumerate(said()) if m.startswith("Loading"))
        assert len(busy) == 1 and busy[0] < loading, said()
        caplog.clear()
        assert main(["chat", str(tmp_path / "run"), "--prompt", "hi"]) == 0
        assert sum(m.startswith("The CPU is busy") for m in said()) == 1  # run on 1 thread beside 2 busy cores
