"""Shared pieces of every export: output-path safety, results, file listings."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.errors import ExportError, MissingDependencyError
from peftkit.utils.atomic import atomic_write_text, mark_when_written

EXPORT_MARKER = ".peftkit-export"  # in every export folder: `--force` may replace what holds it
DTYPE_NAMES = ("float32", "bfloat16", "float16")
_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)\s*$", re.IGNORECASE)


@dataclass
class ExportResult:
    """What an export wrote and what its checks measured (the CLI prints this)."""

    path: Path
    kind: str
    files: list[str] = field(default_factory=list)
    verification: dict[str, Any] | None = None
    qlora: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_shard_size(text: str) -> int:
    """`2GB` / `500MB` / `1.5GiB` -> bytes (transformers' own parser takes integers only)."""
    match = _SIZE.match(text)
    if not match:
        raise ExportError(f"--shard-size {text!r} is not a size like 2GB, 500MB or 5GiB")
    number = float(text.strip()[: match.start(2) - (len(text) - len(text.lstrip()))])
    size = int(number * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise ExportError(f"--shard-size {text!r} must be positive")
    return size


def prepare_output(out: Path, *, force: bool, protected: list[Path]) -> Path:
    """Refuse to overwrite an existing output without --force; never a run's own files or a folder peftkit
    did not write, even with it (a mistyped --out must not cost anyone their data)."""
    out = Path(out).expanduser().resolve()
    for run_dir in protected:
        run_dir = Path(run_dir).resolve()
        for keep in (run_dir, run_dir / "adapter", run_dir / "tokenizer", run_dir / "checkpoints"):
            if out == keep or keep.is_relative_to(out):
                raise ExportError(
                    f"refusing to write the export to {out}: that would replace {keep}, which the run needs; "
                    f"choose another --out (the default is inside {run_dir})"
                )
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is a file; --out must be a directory")
    if out.exists() and not written_by_peftkit(out):
        names = sorted(p.name for p in out.iterdir())
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise ExportError(
            f"{out} holds files peftkit did not write ({shown}); peftkit never deletes a folder it did not write, "
            "even with --force: choose another --out, or empty that folder yourself"
        )
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to overwrite it, or choose another --out")
    mark_when_written(out, EXPORT_MARKER)
    return out


def written_by_peftkit(folder: Path) -> bool:
    """An empty folder or a peftkit export: exports before the marker are recognised by files they always hold."""
    if not any(folder.iterdir()):
        return True
    if (folder / EXPORT_MARKER).is_file() or (folder / "verification.json").is_file():  # any verified export
        return True
    if (folder / "adapter_config.json").is_file() and (folder / "manifest.json").is_file():  # adapter export
        return True
    if _head(folder / "Modelfile").startswith(("# Ollama Modelfile written by peftkit",  # GGUF export
                                               "# Ollama: base model + this LoRA.")):  # GGUF adapter export
        return True
    card = _head(folder / "README.md")  # HF export with --no-verify: its card's front matter is tagged peftkit
    return card.startswith("---\n") and "\n- peftkit\n" in card.split("\n---\n", 1)[0]


def _head(path: Path, size: int = 4096) -> str:
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            return handle.read(size)
    except OSError:
        return ""


def list_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != EXPORT_MARKER)


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def save_failed_report(target: Path, report: dict[str, Any]) -> Path:
    """Keep a failed verification's numbers next to where the export would have gone."""
    path = target.with_name(f"{target.name}.verification-failed.json")
    write_json(path, report)
    return path


def gguf_package() -> Any:
    """The `gguf` package, imported when a GGUF export needs it."""
    try:
        import gguf
    except ImportError:
        raise MissingDependencyError("GGUF export needs the `gguf` package: `pip install gguf`") from None
    return gguf
