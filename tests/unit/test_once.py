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
