"""The console commands print their results on: rich's, leaving quietly when the reader of stdout goes away."""

from __future__ import annotations

from typing import Any


def stdout_console(**kwargs: Any) -> Any:
    """A rich Console for a command's output. rich ends the process with status 1 on a closed pipe
    (`peftkit validate --show-data 30 | head`); raising BrokenPipeError instead lets the CLI exit as every other
    command does there: quietly, with the shell's SIGPIPE status (141)."""
    from rich.console import Console

    class _PipeAwareConsole(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError("stdout was closed by its reader")

    return _PipeAwareConsole(**kwargs)
