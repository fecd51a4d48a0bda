"""Errors that peftkit reports to users.

Every error says what is wrong and what to do next. The CLI prints them without a
traceback and exits with ``exit_code`` (2 for bad input).
"""

from __future__ import annotations


class PeftkitError(Exception):
    """Base class: a problem the user can fix."""

    exit_code = 2


class ConfigError(PeftkitError, ValueError):
    """A recipe is invalid. Carries every problem found, not just the first."""

    def __init__(self, problems: list[str] | str, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            message = f"Invalid recipe{where}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"Invalid recipe{where} ({len(self.problems)} problems):\n{lines}"
        super().__init__(message)


class DataError(PeftkitError, ValueError):
    """A dataset file is missing, empty or malformed."""


class ModelNotFoundError(PeftkitError, FileNotFoundError):
    """A model reference cannot be resolved to weights."""


class MissingDependencyError(PeftkitError, ImportError):
    """An optional package is needed for the requested feature."""


class RunDirError(PeftkitError, FileNotFoundError):
    """A run directory is missing something a command needs."""


class ExportError(PeftkitError, ValueError):
    """A merge or export cannot be done as asked, or its verification failed."""


class TrainingDivergedError(PeftkitError, ArithmeticError):
    """The loss or gradient became inf / NaN: the weights are ruined from that step on."""

    exit_code = 1
