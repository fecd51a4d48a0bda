"""Errors that peftkit reports to users.

Every error says what is wrong and what to do next. The CLI prints them without a
traceback and exits with ``exit_code`` (2 for bad input).
"""

from __future__ import annotations

import errno
import re


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


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that temporary folders are removed and a verification child is
    stopped on the way out (the default action ends the process on the spot, leaving both behind). Not a
    KeyboardInterrupt: the chat REPL takes Ctrl-C as "stop this reply", which a SIGTERM is not. Defined here, not in
    the CLI: workers run `python -m peftkit.cli`, whose `__main__` copy would not catch the class `peftkit.cli` has."""


_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile (gguf-py) on a full disk
_DISK_FULL_TEXTS = ("No space left on device", "[Errno 28]", "os error 28", "Disk quota exceeded")


def is_file_too_large(exc: BaseException | None) -> bool:
    """A write past the largest file the filesystem (FAT32: 4 GB) or `ulimit -f` allows, anywhere in an exception's
    chain: EFBIG, or safetensors' / tokenizers' `os error 27`."""
    while exc is not None:
        if getattr(exc, "errno", None) == errno.EFBIG or any(t in str(exc) for t in ("File too large", "os error 27")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def is_disk_full(exc: BaseException | None) -> bool:
    """A full disk anywhere in an exception's chain, however the writer words it: an OSError (ENOSPC, EDQUOT),
    safetensors' `os error 28`, numpy's short write, torch's checkpoint writer (`unexpected pos N vs M`)."""
    while exc is not None:
        text = str(exc)
        if (getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(t in text for t in _DISK_FULL_TEXTS)
                or _SHORT_WRITE.search(text) or (isinstance(exc, RuntimeError) and "unexpected pos" in text)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
