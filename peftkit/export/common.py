"""Shared pieces of every export: output-path safety, results, file listings."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from peftkit.errors import ExportError, MissingDependencyError, is_disk_full
from peftkit.export import output_lock
from peftkit.export.gguf_types import GGUF_TYPES
from peftkit.models.resolve import TOKENIZER_FILES
from peftkit.train.run_dir import LOCK_FILE, is_peftkit_run
from peftkit.utils.atomic import atomic_write_text, free_space, mark_when_written, marked_entries, write_problem
from peftkit.utils.readable_json import readable_json
from peftkit.utils.sizes import readable_size

EXPORT_MARKER = ".peftkit-export"  # in every export folder: `--force` may replace what holds it
PEFTKIT_FILES = (EXPORT_MARKER, LOCK_FILE)
"""Hidden files of peftkit's own, never a user's (the lock: left in an export folder by versions that locked any folder
given to `export` / `eval`)."""
RUN_OWN_FOLDERS = ("adapter", "tokenizer", "checkpoints")
"""A run's folders that tools read as a whole: no export goes into or over them."""
DTYPE_NAMES = ("float32", "bfloat16", "float16")
_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)\s*$", re.IGNORECASE)


_TOKENIZER_FILES = (*TOKENIZER_FILES, "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                    "chat_template.json", "merges.txt", "*.tiktoken")
EXPORT_FILES = {
    "hf": ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "config.json",
           "generation_config.json", "README.md", "verification.json", *_TOKENIZER_FILES),
    "adapter": ("adapter_config.json", "adapter_model.safetensors", "manifest.json", "labels.json", "README.md",
                "verification.json", *_TOKENIZER_FILES),
    "gguf": (*(f"*-{t}.gguf" for t in GGUF_TYPES), "Modelfile", "verification.json"),  # a model GGUF or a GGUF LoRA
}
"""The file names each kind of export writes: an export from before the marker holds nothing else."""

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
        for keep in (run_dir, *(run_dir / name for name in RUN_OWN_FOLDERS)):
            if out == keep or keep.is_relative_to(out):
                raise ExportError(
                    f"refusing to write the export to {out}: that would replace {keep}, which the run needs; "
                    f"choose another --out (the default is inside {run_dir})"
                )
    for run_dir in [*(p for p in out.parents if _is_run(p)), *map(Path, protected)]:  # this run or another
        run_dir = run_dir.resolve()
        for keep in (run_dir / name for name in RUN_OWN_FOLDERS):
            if out.is_relative_to(keep):
                raise ExportError(
                    f"refusing to write the export to {out}: it is {'' if out == keep else 'inside '}{keep}, which "
                    "holds a run's own files (a checkpoint or adapter folder that tools read as a whole); choose "
                    "another --out (the default is inside the run directory)"
                )
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is a file; --out must be a directory")
    if out.is_dir() and _is_run(out):
        raise ExportError(f"{out} is a peftkit run directory (its adapter, checkpoints and metrics); an export never "
                          "replaces a run: choose another --out")
    _check_writable(out)
    output_lock.claim(out)
    if out.exists() and not written_by_peftkit(out):
        names = foreign_export_entries(out)
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise ExportError(
            f"{out} holds files peftkit did not write ({shown}); peftkit never deletes a folder it did not write, "
            "even with --force: choose another --out, or empty that folder yourself"
        )
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to overwrite it, or choose another --out")
    mark_when_written(out, EXPORT_MARKER)
    return out


def _is_run(folder: Path) -> bool:
    try:
        return is_peftkit_run(folder)
    except OSError:  # a folder this user cannot look into
        return False


def _check_writable(out: Path) -> None:
    """The export goes into a temporary sibling of `out`, renamed when complete: say now, before minutes of
    loading, when that folder cannot be created there (not afterwards, naming the hidden temporary)."""
    problem = write_problem(out)
    if problem:
        raise ExportError(f"cannot write the export to {out}: {problem}; choose another --out, in a folder you can "
                          "write")


def foreign_export_entries(folder: Path) -> list[str]:
    """The entries of an export folder that peftkit did not write, as far as it can tell: those its marker does not
    list; in an export from before the marker listed them, those no export writes (else all, to name something)."""
    names = sorted(p.name for p in folder.iterdir() if p.name not in PEFTKIT_FILES)
    listed = marked_entries(folder / EXPORT_MARKER)
    if listed is not None:
        return [name for name in names if name not in listed]
    return [name for name in names if not any(_is_export_file(name, kind) for kind in EXPORT_FILES)] or names


def _is_export_file(name: str, kind: str) -> bool:
    return any(fnmatch(name, pattern) for pattern in EXPORT_FILES[kind])


def written_by_peftkit(folder: Path) -> bool:
    """An empty folder or a peftkit export. Exports before the marker are recognised by a file only peftkit
    writes, and only while every entry is a file that kind of export writes: a folder that merely holds a
    `verification.json` next to the user's own files is not one (--force would delete them)."""
    entries = [p for p in folder.iterdir() if p.name not in PEFTKIT_FILES]
    if not entries:
        return True
    listed = marked_entries(folder / EXPORT_MARKER)
    if listed is not None:  # the marker names what the export wrote: e.g. a llama-quantize output added later is not
        return {p.name for p in entries} <= listed
    if not any(all(p.is_file() and _is_export_file(p.name, kind) for p in entries) for kind in EXPORT_FILES):
        return False
    if (folder / EXPORT_MARKER).is_file():  # a marker from before it listed the files
        return True
    if (folder / "verification.json").is_file():  # any verified export
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
    atomic_write_text(path, readable_json(data, indent=2, default=str) + "\n")


def write_verification(tmp: Path, final: Path, report: dict[str, Any]) -> dict[str, Any]:
    """verification.json in the export being written (`tmp`), its paths naming where the export ends up (`final`):
    the check ran on the temporary folder, which is gone once the export is in place. Returns that report."""
    def moved(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(str(tmp), str(final))
        if isinstance(value, dict):
            return {k: moved(v) for k, v in value.items()}
        if isinstance(value, list):
            return [moved(v) for v in value]
        return value

    report = moved(report)
    write_json(tmp / "verification.json", report)
    return report


@contextlib.contextmanager
def disk_full_as_error(folder: Path, fix: str = "free some space there, or choose another --out") -> Iterator[None]:
    """A full disk while writing `folder`: one clear error instead of a traceback (safetensors and torch raise
    RuntimeError-like errors, numpy a short-write OSError, none of them naming the folder)."""
    try:
        yield
    except ExportError:
        raise
    except Exception as exc:
        if is_disk_full(exc):
            raise ExportError(f"no space left on device while writing {folder}: {fix}") from exc
        raise


_BYTES_PER_WEIGHT = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "f32": 4.0, "f16": 2.0, "q8_0": 34 / 32,
                     "q5_1": 24 / 32, "q5_0": 22 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32}
"""Bytes a weight takes in the file, for each export dtype and GGUF type (block types: their blocks of 32)."""


def weights_file_bytes(model: Any, file_type: str) -> float:
    """About what `model`'s weights take on disk as `file_type` (an export dtype or a GGUF type); tied weights once.
    A GGUF keeps vectors in float32, a 4- or 5-bit one its output head (or the tied embedding) in Q8_0, and rows
    that are no multiple of a block's 32 weights in f16 (gguf_writer.tensor_type, quantize_array)."""
    unique = {t.data_ptr(): t for t in model.state_dict().values() if t.device.type != "meta"}.values()
    if file_type in DTYPE_NAMES:
        return sum(t.numel() for t in unique) * _BYTES_PER_WEIGHT[file_type]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ptr = head.weight.data_ptr() if head is not None and getattr(head, "weight", None) is not None else None

    def per_weight(t: Any) -> float:
        if t.dim() <= 1:
            return 4.0
        kind = "q8_0" if file_type.startswith(("q4", "q5")) and t.data_ptr() == head_ptr else file_type
        return 2.0 if kind.startswith("q") and t.shape[-1] % 32 else _BYTES_PER_WEIGHT[kind]

    return sum(t.numel() * per_weight(t) for t in unique)


def check_room(out: Path, model: Any, file_type: str, what: str) -> None:
    """Refuse, before writing, an export whose weights cannot fit next to `out` (the temporary copy is written there,
    and with --force the old export stays until the new one is in place)."""
    needed = weights_file_bytes(model, file_type)
    measured = free_space(out.parent)
    if measured is None:
        return
    folder, free = measured
    if free < needed:
        raise ExportError(f"not enough free space for the {what} in {folder}: it takes about {readable_size(needed)} "
                          f"({file_type}), and {readable_size(free)} is free; free some space there, or choose another --out")


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
