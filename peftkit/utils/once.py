"""Findings said once per command: a command reads its data more than once (the recipe check, validate's data line,
--show-data; training with base-answered replay), and each read would say the same again. A command is the outermost
`command_scope()` (a CLI command, a `train()` / `evaluate_run()` / `validate_recipe()` call from Python): the next one,
in the same process (a notebook), says its findings again."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_SAID: set[Hashable] = set()
_REMEMBERED: list[set[Any]] = []  # other modules' said-once sets, forgotten with _SAID
_PENDING: list[list[Any]] = []  # findings kept for a later moment of a command, dropped when it ends
_depth = 0


def as_command(function: Callable[..., T]) -> Callable[..., T]:
    """`function` as one command (command_scope), for a public entry point a Python caller uses on its own."""

    @functools.wraps(function)
    def command(*args: Any, **kwargs: Any) -> T:
        with command_scope():
            return function(*args, **kwargs)

    return command


def remembered(said: set[Any]) -> set[Any]:
    """Register a module's own set of findings already said (keyed on a topic, not the message), so that a new
    command forgets it too; returns the set."""
    _REMEMBERED.append(said)
    return said


def pending(items: list[Any]) -> list[Any]:
    """Register a module's list of findings kept for later in a command (a busy CPU is said when the first model
    loads: a command refused before that says its refusal alone), dropped when the command ends; returns the list."""
    _PENDING.append(items)
    return items


def in_command() -> bool:
    return _depth > 0


@contextlib.contextmanager
def command_scope() -> Iterator[None]:
    """One command: its outermost entry forgets what earlier commands said, and its end drops what it kept back."""
    global _depth
    if _depth == 0:
        _SAID.clear()
        for said in _REMEMBERED:
            said.clear()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            for kept in _PENDING:
                kept.clear()


def say_once(logger: logging.Logger, level: int, message: str, key: Hashable = None) -> None:
    """Log `message` at `level` unless it (or `key`, where the message alone does not name what it is about) was
    said already. Where `logger` would not show it (a read with its warnings silenced), nothing is said, and so
    nothing is kept back from a later read that shows it."""
    key = message if key is None else (message, key)
    if key not in _SAID and logger.isEnabledFor(level):
        _SAID.add(key)
        logger.log(level, "%s", message)


# `peftkit train --nproc N` checks the recipe and reads the data in the launching process, and then each worker does
# the same: every warning came 1 + N times. The launcher passes the digests of the warnings it showed to its workers,
# which keep them back.
SAID_BY_LAUNCHER_ENV = "PEFTKIT_SAID_BY_LAUNCHER"


def _is_warning(record: logging.LogRecord) -> bool:
    return logging.WARNING <= record.levelno < logging.ERROR  # errors are always shown


def _digest(record: logging.LogRecord) -> str:
    return hashlib.sha1(record.getMessage().encode("utf-8", "replace")).hexdigest()[:16]


class WarningLedger(logging.Filter):
    """On a log handler: notes the warnings it shows (their digests, in the order first shown), passing every record
    on."""

    def __init__(self) -> None:
        super().__init__()
        self.digests: dict[str, None] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if _is_warning(record):
            self.digests.setdefault(_digest(record))
        return True


class KeepBackSaid(logging.Filter):
    """On a log handler: drops the warnings whose digests are given (said by the process that launched this one)."""

    def __init__(self, digests: Iterable[str]) -> None:
        super().__init__()
        self.digests = frozenset(digests)

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_is_warning(record) and _digest(record) in self.digests)


LEDGER = WarningLedger()


def said_by_launcher_env() -> dict[str, str]:
    """The environment entry that tells launched workers which warnings this process showed."""
    return {SAID_BY_LAUNCHER_ENV: ",".join(list(LEDGER.digests)[-2000:])}  # bounded: an environment entry has a size limit


def track_warnings(handler: logging.Handler, environ: dict[str, str] | None = None) -> None:
    """Note the warnings `handler` shows, and keep back those the launching process showed already."""
    env = os.environ if environ is None else environ
    handler.addFilter(LEDGER)
    if said := env.get(SAID_BY_LAUNCHER_ENV):
        handler.addFilter(KeepBackSaid(said.split(",")))
