"""Thread counts on a shared CPU: what the user set is kept, otherwise the cores free now (a tester measured training
on both cores of a 2-core machine next to another job at 10x the time of training on the free one)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from peftkit.config import recipe_from_dict
from peftkit.utils import threads as threads_module
from peftkit.utils.threads import CpuLoad, choose_threads, configure_threads, other_runnable_tasks


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _machine(monkeypatch, *, cores: int, load: float, others: int | None) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(threads_module, "other_runnable_tasks", lambda: others)


def test_configure_threads_follows_the_recipe_then_omp_num_threads_then_every_core(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    current = torch.get_num_threads()
    assert configure_threads(None) == current != 64
    assert configure_threads(1) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    assert configure_threads(None) == 64


def test_without_a_setting_a_busy_cpu_gets_the_cores_that_are_free(monkeypatch, caplog):
    _machine(monkeypatch, cores=4, load=5.0, others=3)
    with caplog.at_level(logging.WARNING):
        assert choose_threads(None, "training", "train.num_threads") == 1
    assert torch.get_num_threads() == 1
    assert "training on 1 of the 4 cores" in caplog.text and "set train.num_threads" in caplog.text
    assert "3 other threads running now" in caplog.text
    caplog.clear()
    _machine(monkeypatch, cores=2, load=6.0, others=9)
    with caplog.at_level(logging.WARNING):
        assert choose_threads(None, "training", "train.num_threads") == 1  # at least one


def test_a_load_left_over_from_the_last_run_is_not_a_busy_cpu(monkeypatch, caplog):
    """`make quickstart` chats right after training: the 1-minute load average is still high, nothing else runs."""
    _machine(monkeypatch, cores=2, load=2.0, others=0)
    with caplog.at_level(logging.WARNING):
        assert choose_threads(None, "chatting", "OMP_NUM_THREADS") == 2
    assert not caplog.records
    _machine(monkeypatch, cores=2, load=0.3, others=4)  # a moment's spike after an idle minute
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


def test_where_the_system_does_not_count_running_threads_it_only_warns(monkeypatch, caplog):
    _machine(monkeypatch, cores=2, load=3.0, others=None)
    with caplog.at_level(logging.WARNING):
        assert choose_threads(None, "training", "train.num_threads") == 2
    assert "load 3.0 on 2 cores" in caplog.text and "set train.num_threads" in caplog.text


def test_off_the_cpu_the_load_is_not_looked_at(monkeypatch, caplog):
    _machine(monkeypatch, cores=2, load=9.0, others=5)
    with caplog.at_level(logging.WARNING):
        assert choose_threads(None, "training", "train.num_threads", on_cpu=False) == 2
    assert not caplog.records


def test_the_running_count_comes_from_proc_loadavg():
    count = other_runnable_tasks(samples=3, interval=0.0)
    if os.path.exists("/proc/loadavg"):
        assert isinstance(count, int) and count >= 0
    else:
        assert count is None  # not Linux: the load average alone decides (tested above)
    assert CpuLoad(2.5, 2, 1).describe() == "load 2.5 on 2 cores, 1 other thread running now"


def test_chat_and_eval_use_omp_num_threads_before_the_run_recipe(tiny_recipe, monkeypatch, caplog):
    from peftkit.cli import main
    from peftkit.train.run import train

    run = train(recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 1, "num_threads": 1},
                                  "eval": {"before": False}, "data": {**tiny_recipe["data"], "heldout": None}})).run_dir
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    _machine(monkeypatch, cores=2, load=4.0, others=2)
    torch.set_num_threads(2)
    with caplog.at_level(logging.WARNING):
        assert main(["chat", str(run), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert torch.get_num_threads() == 1  # the run's train.num_threads
    assert "chatting on 1 thread next to other jobs" in caplog.text and "run it alone" in caplog.text
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["eval", str(run), "--no-base", "--out", str(run / "e.json")]) == 0
    assert torch.get_num_threads() == 2  # the user's OMP_NUM_THREADS wins over the recipe
    assert "evaluating on 2 threads" in caplog.text and "OMP_NUM_THREADS=1 peftkit" in caplog.text
