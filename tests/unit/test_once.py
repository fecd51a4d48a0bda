"""Findings said once per process (utils/once.py)."""

from __future__ import annotations

import logging

from peftkit.utils import once
from peftkit.utils.once import say_once


def test_a_finding_is_said_once_per_key_and_a_silenced_read_keeps_nothing_back(monkeypatch, caplog):
    monkeypatch.setattr(once, "_SAID", set())
    log = logging.getLogger("peftkit.test_once")
    with caplog.at_level(logging.WARNING, logger="peftkit.test_once"):
        log.setLevel(logging.ERROR)  # as the evaluation silences its rebuilding of the eval split
        say_once(log, logging.WARNING, "finding")
        assert "finding" not in caplog.text
        log.setLevel(logging.NOTSET)
        say_once(log, logging.WARNING, "finding")
        say_once(log, logging.WARNING, "finding")
        say_once(log, logging.WARNING, "finding", key="other data")
    assert caplog.text.count("finding") == 2, "once, then once more about other data"


def test_workers_keep_back_the_warnings_their_launcher_showed(monkeypatch):
    """`train --nproc 2` said each recipe and data warning three times: the launcher's check, then each worker's."""
    monkeypatch.setattr(once, "LEDGER", once.WarningLedger())

    def shown(handler: logging.Handler, level: int, message: str) -> bool:
        return handler.filter(logging.LogRecord("peftkit.x", level, __file__, 1, message, None, None)) is not False

    launcher = logging.Handler()
    once.track_warnings(launcher, environ={})
    for message in ("train.lr 0.5 is ten times ...", "train.lr 0.5 is ten times ..."):
        assert shown(launcher, logging.WARNING, message)
    shown(launcher, logging.INFO, "Loading the model")  # not a warning: not passed on
    env = once.said_by_launcher_env()
    assert len(env[once.SAID_BY_LAUNCHER_ENV].split(",")) == 1

    worker = logging.Handler()
    once.track_warnings(worker, environ=env)
    assert not shown(worker, logging.WARNING, "train.lr 0.5 is ten times ...")
    assert shown(worker, logging.WARNING, "a warning only the worker finds")
    assert shown(worker, logging.INFO, "Loading the model")
    assert shown(worker, logging.ERROR, "train.lr 0.5 is ten times ...")  # errors are always shown
    plain = logging.Handler()
    once.track_warnings(plain, environ={})
    assert shown(plain, logging.WARNING, "train.lr 0.5 is ten times ...")


def test_each_command_says_its_findings_again_but_not_twice_within_itself(monkeypatch, caplog):
    """A notebook's second train() on the same data said nothing of the duplicates the first one was told about."""
    monkeypatch.setattr(once, "_SAID", set())
    topics = once.remembered(set())
    log = logging.getLogger("peftkit.test_once")
    with caplog.at_level(logging.WARNING, logger="peftkit.test_once"):
        for _ in range(2):  # two commands
            with once.command_scope():
                topics.add("chatml")
                say_once(log, logging.WARNING, "duplicates")
                with once.command_scope():  # train() inside the CLI's command: the same command
                    say_once(log, logging.WARNING, "duplicates")
                    assert "chatml" in topics
            assert "chatml" in topics  # kept until the next command starts
    assert caplog.text.count("duplicates") == 2
    once._REMEMBERED.remove(topics)
