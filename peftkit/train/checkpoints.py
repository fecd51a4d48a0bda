"""Checkpoint completeness: a checkpoint counts only once its `.complete` marker exists.

The Trainer writes `checkpoint-N/` file by file; a process killed mid-save leaves a partial
folder. We mark a checkpoint complete (after fsync) in `on_save`, and resume only from marked ones.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

MARKER = ".complete"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_complete(run_dir: Path) -> Path | None:
    complete = [p for p in checkpoint_dirs(run_dir) if (p / MARKER).is_file()]
    return complete[-1] if complete else None


def remove_incomplete(run_dir: Path) -> list[Path]:
    removed = [p for p in checkpoint_dirs(run_dir) if not (p / MARKER).is_file()]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _fsync_dir_files(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


class CompleteMarkerCallback(TrainerCallback):
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            _fsync_dir_files(folder)
            (folder / MARKER).write_text(str(state.global_step))
