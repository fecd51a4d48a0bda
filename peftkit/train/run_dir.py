"""The run directory's life: what may be started, replaced or resumed there, and what a resumed run needs back.

peftkit deletes only folders it made itself (a `.peftkit-run` marker, or the files of an older run), and only
once the new run's data has been checked, so a failing `--force` loses nothing. A resumed run must use the
recipe it was started with: the checkpoint's optimizer, schedule and adapter shapes come from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from peftkit.errors import RunDirError
from peftkit.train import checkpoints
from peftkit.utils.atomic import atomic_write_text, remove_dead_writers_temporaries
from peftkit.utils.flock import lock_now, write_holder
from peftkit.utils.readable_json import readable_json

log = logging.getLogger(__name__)

RUN_MARKER = ".peftkit-run"
LOCK_FILE = ".peftkit-lock"
"""Held (flock) by the process training into the folder; the OS releases it when that process ends, killed or not."""
BEFORE_FILE = "before.json"
"""Measurements of the untrained model, kept for the summary of a run that is resumed later."""
RESUME_MAY_CHANGE = ("description", "eval.", "train.num_threads", "train.logging_steps", "train.hashed_dropout",
                     "output_dir")
"""Recipe keys that do not touch the training state, so a resumed run may change them (`output_dir`: the run is
the folder being resumed, however it is named: `peftkit train RUN_DIR --resume`, or a moved run;
`train.hashed_dropout`: which generator draws the dropout masks to come, a key runs written before it lack)."""


def unwritable(run_dir: Path, exc: OSError) -> RunDirError:
    return RunDirError(f"cannot write the run directory {run_dir} ({exc.strerror}); set output_dir to a writable place")


@contextlib.contextmanager
def run_lock(run_dir: Path, *, enabled: bool = True) -> Iterator[None]:
    """Only one peftkit process trains into a folder at a time: a second `train` (with --force or --resume) would
    delete or interleave the first one's checkpoints and metrics."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        enabled = False
    if not enabled or (run_dir.exists() and not run_dir.is_dir()):  # a file: check_run_dir says so
        yield
        return
    created = list(itertools.takewhile(lambda folder: not folder.exists(), [run_dir, *run_dir.parents]))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = (run_dir / LOCK_FILE).open("a+", encoding="utf-8")
    except OSError as exc:
        raise unwritable(run_dir, exc) from None
    holder = lock_now(handle)  # empty: merge / export / eval hold it shared
    if holder is not None:
        handle.close()
        raise in_use(run_dir, holder)
    write_holder(handle)
    try:
        yield
    finally:
        (run_dir / LOCK_FILE).unlink(missing_ok=True)  # no stray file in a folder the run never used
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
        for folder in created:  # a start that failed before writing anything leaves nothing, nor the parents it made
            if any(folder.iterdir()):
                break
            folder.rmdir()


def in_use(run_dir: Path, holder: str) -> RunDirError:
    if not holder:  # shared holders (`reading_runs`) write no name
        return RunDirError(f"{run_dir} is in use: another peftkit command (merge, export or eval) is reading it; "
                           "wait for it to end, or set another output_dir")
    return RunDirError(f"{run_dir} is in use: peftkit is training into it ({holder}); wait for that run to end "
                       "or stop it (Ctrl-C saves a checkpoint), or set another output_dir")


@contextlib.contextmanager
def reading_runs(*run_dirs: Path | str) -> Iterator[None]:
    """Merge, export and eval hold the runs they read under a shared lock: `train --force` (or `--resume`) into one
    of them is refused meanwhile instead of deleting the adapter being read, and they refuse a run that is training.
    A run folder they cannot write to (a read-only copy), or a folder that is no run, is read without a lock. The
    (hidden) lock file stays: a reader that removed it could strand another one's lock on the removed file, which
    `train` would not see."""
    try:
        import fcntl  # noqa: F401 - only to know it is there
    except ImportError:  # not on POSIX: no lock
        yield
        return
    with contextlib.ExitStack() as stack:
        for run_dir in map(Path, run_dirs):
            if not ((run_dir / RUN_MARKER).is_file() or (run_dir / "recipe.yaml").is_file()):
                continue  # not a run (a merged folder, a base model): the command says so; no lock file left there
            try:
                handle = stack.enter_context((run_dir / LOCK_FILE).open("a+", encoding="utf-8"))
            except OSError:
                continue
            holder = lock_now(handle, shared=True)
            if holder is not None:
                raise RunDirError(f"{run_dir} is still training ({holder or 'another process'}); wait for that run to "
                                  "end")
        yield


def training_in(run_dir: Path) -> str | None:
    """Who holds the run's lock ("pid N, since ..."), or None when no process is training into it."""
    try:
        import fcntl

        handle = (run_dir / LOCK_FILE).open("r", encoding="utf-8")
    except (ImportError, OSError):
        return None
    with handle:
        holder = lock_now(handle, shared=True)
        if holder is not None:
            return holder or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


_EXPORTS = ("merged", "gguf", "adapter-export", "gguf-adapter")  # the exports' default places in a run
RUN_FILES = frozenset({
    "adapter", "model", "tokenizer", "checkpoints", "tensorboard", "plots", "recipe.yaml", "metrics.jsonl",
    "summary.json", "heldout.jsonl", BEFORE_FILE, "interrupted.json", "README.md", "labels.json",
    "replay_answers.jsonl", "deepspeed.json", "eval.json", "eval_original_base.json",
    *_EXPORTS, *(f"{name}.verification-failed.json" for name in _EXPORTS),
})
"""What peftkit writes into a run directory (training, eval, default exports): all that --force may delete."""
_CHECKPOINT_ENTRY = re.compile(r"^(tmp-|\.damaged-)?checkpoint-\d+$|^runs$")  # .damaged-: set aside on a resume


WRITTEN_LISTING = ".peftkit-files"
"""In a run directory: the entries peftkit saved into adapter/, model/ and tokenizer/ (JSON, folder -> names)."""
_RUN_FOLDER_FILES = {
    "checkpoints": _CHECKPOINT_ENTRY,
    "plots": re.compile(r"^loss\.png$"),
    "tensorboard": re.compile(r"^events\.out\.tfevents\."),
    # folders of runs from before WRITTEN_LISTING: what transformers and peft save there
    "adapter": re.compile(r"^(adapter_config\.json|adapter_model\.safetensors|README\.md)$"),
    "model": re.compile(r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors"
                        r"|model\.safetensors\.index\.json|README\.md)$"),
    "tokenizer": re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|chat_template\.(jinja|json)"
                            r"|vocab\.(json|txt)|merges\.txt|.*\.model|.*\.tiktoken)$"),
}
"""What peftkit writes into a run's folders (adapter/, model/ and tokenizer/: WRITTEN_LISTING where it exists)."""


def record_written(run_dir: Path, *folders: str) -> None:
    """Note what the run just saved into `folders`, so that `train --force` can tell a user's file put there."""
    listing = _written(run_dir)
    listing.update({name: sorted(p.name for p in (run_dir / name).iterdir()) for name in folders})
    atomic_write_text(run_dir / WRITTEN_LISTING, json.dumps(listing, indent=1) + "\n")


def _written(run_dir: Path) -> dict[str, list[str]]:
    try:
        listing = json.loads((run_dir / WRITTEN_LISTING).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return listing if isinstance(listing, dict) else {}


def foreign_entries(run_dir: Path) -> list[str]:
    """Entries peftkit did not write: a user's files, or a project folder used as output_dir. Hidden entries of the
    run directory itself are left alone (the marker, a `.gitkeep`); inside its folders only half-written leftovers."""
    found = [p.name for p in run_dir.iterdir() if not p.name.startswith(".") and p.name not in RUN_FILES]
    from peftkit.export.common import foreign_export_entries, written_by_peftkit

    for name in _EXPORTS:  # e.g. a llama-quantize output put into RUN/gguf
        folder = run_dir / name
        if folder.is_dir() and not written_by_peftkit(folder):
            found += [f"{name}/{entry}" for entry in foreign_export_entries(folder)] or [f"{name}/"]
    listing = _written(run_dir)
    for name, written in _RUN_FOLDER_FILES.items():
        folder = run_dir / name
        if not folder.is_dir() or folder.is_symlink():
            continue
        own = listing.get(name)
        found += [f"{name}/{p.name}" for p in folder.iterdir() if not p.name.startswith(".tmp-")
                  and not (p.name in own if isinstance(own, list) else written.match(p.name))]
    return sorted(found)


def is_peftkit_run(run_dir: Path) -> bool:
    """A folder peftkit made: the marker, or (runs written before the marker) a recipe next to a summary or
    checkpoints. A project folder may look like that too: replacing a run (`clear_run_dir`) refuses any folder
    that holds what a run does not, so this decides only what may be resumed."""
    return (run_dir / RUN_MARKER).is_file() or (
        (run_dir / "recipe.yaml").is_file()
        and ((run_dir / "summary.json").is_file() or (run_dir / "checkpoints").is_dir())
    )


def _refuse_foreign(run_dir: Path) -> None:
    """Replacing a run deletes its files, never a user's files kept beside them."""
    foreign = foreign_entries(run_dir)
    if not foreign:
        return
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    raise RunDirError(
        f"output_dir {run_dir} holds files that are not a run's own ({shown}): your files, or reports you named "
        "(`peftkit eval --out`, an export's --out); peftkit never deletes those, not even with --force: move them "
        "out of the folder, or set output_dir to a new or empty folder"
    )


def _has_content(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(not p.name.startswith(".") for p in run_dir.iterdir())


def _has_started(run_dir: Path) -> bool:
    """Training has begun: a metric or checkpoint exists (a run that failed while loading has neither)."""
    return (run_dir / "metrics.jsonl").is_file() or bool(checkpoints.checkpoint_dirs(run_dir)) or (run_dir / "summary.json").is_file()


def check_run_dir(run_dir: Path, *, resume: bool, force: bool, recipe_dump: dict[str, Any]) -> bool:
    """Raise when `run_dir` cannot be used as asked (a resumed run must keep its recipe: `recipe_dump`, the
    recipe's `model_dump(mode="json")`); True when it holds an earlier run to replace (see `clear_run_dir`)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"output_dir {run_dir} is a file; set output_dir to a new or empty folder")
    if not _has_content(run_dir):
        if resume:
            raise RunDirError(f"--resume: {run_dir} holds no run to resume; start it without --resume")
        return False
    if not is_peftkit_run(run_dir):
        raise RunDirError(
            f"output_dir {run_dir} is a folder that peftkit did not create (no {RUN_MARKER} marker), and it is not empty; "
            "peftkit never deletes such a folder, not even with --force: set output_dir to a new or empty folder"
        )
    if resume:
        checkpoints.refuse_if_all_damaged(run_dir)
        if checkpoints.latest_loadable(run_dir) is None:
            raise RunDirError(
                f"--resume: {run_dir} has no complete checkpoint yet; start again with --force "
                "(checkpoints are written every train.save_steps steps, or each epoch)"
            )
        check_resume_recipe(run_dir, recipe_dump)
        return False
    if force or not _has_started(run_dir):  # a run that failed before training has nothing to lose
        _refuse_foreign(run_dir)  # now, not after minutes of loading: clear_run_dir would refuse
        return True
    if (run_dir / "summary.json").is_file():
        raise RunDirError(
            f"{run_dir} already holds a finished run; set another output_dir (e.g. output_dir={run_dir}-2) "
            "or pass --force to overwrite it"
        )
    from peftkit.train.checkpoints import latest_complete

    if latest_complete(run_dir) is None:
        raise RunDirError(f"{run_dir} already exists and holds an unfinished run that saved no checkpoint; pass "
                          "--force to start over")
    damaged = checkpoints.all_damaged(run_dir)
    if damaged:
        raise RunDirError(f"{run_dir} already exists and holds an unfinished run, but {damaged}; pass --force to "
                          "start over")
    changed = recipe_changes(run_dir, recipe_dump)
    if changed:  # --resume would refuse it
        shown = "; ".join(changed[:3]) + ("; ..." if len(changed) > 3 else "")
        raise RunDirError(f"{run_dir} already exists and holds an unfinished run of another recipe ({shown}): set "
                          f"another output_dir for this one, or pass --force to replace that run")
    raise RunDirError(
        f"{run_dir} already exists and holds an unfinished run; pass --resume to continue it or --force to start over"
    )


def clear_run_dir(run_dir: Path) -> None:
    """Remove an earlier run's files (only ever called on a folder `check_run_dir` recognised as a run); hidden
    files stay (the marker, a `.gitkeep`), except what killed merges and exports left half-written. A folder that
    also holds anything peftkit did not write is refused whole, before anything is deleted."""
    _refuse_foreign(run_dir)
    remove_dead_writers_temporaries(run_dir)
    (run_dir / WRITTEN_LISTING).unlink(missing_ok=True)  # of the folders removed below
    for checkpoint in checkpoints.checkpoint_dirs(run_dir):  # unmarked first, as pruning does: a kill mid-way leaves
        if not (checkpoint.is_symlink() or checkpoint.parent.is_symlink()):  # incomplete folders, never marked ones
            (checkpoint / checkpoints.MARKER).unlink(missing_ok=True)  # half gone; a link is unlinked, not entered
    for path in run_dir.iterdir():
        if path.name.startswith(".") or path.name not in RUN_FILES:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def mark_run_dir(run_dir: Path, recipe_yaml: str) -> None:
    """Create the run directory with its marker and the recipe it runs."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / RUN_MARKER, "peftkit run directory: `peftkit train --force` may replace it\n")
    except OSError as exc:
        raise unwritable(run_dir, exc) from None
    atomic_write_text(run_dir / "recipe.yaml", recipe_yaml)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def recipe_changes(run_dir: Path, recipe_dump: dict[str, Any]) -> list[str]:
    """`key: old -> new` for each training setting that differs from the run's stored recipe.yaml."""
    stored_path = run_dir / "recipe.yaml"
    if not stored_path.is_file():
        return []
    try:
        loaded = yaml.safe_load(stored_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        loaded = None
    if not isinstance(loaded, dict):  # not a recipe peftkit wrote: nothing to compare
        return []
    stored = _flatten(loaded)
    current = _flatten(recipe_dump)
    changed = []
    for key in sorted(set(stored) | set(current)):
        if key.startswith(RESUME_MAY_CHANGE) or _no_longer_recorded(key, current):
            continue
        if stored.get(key) != current.get(key):
            changed.append(f"{key}: {stored.get(key)!r} -> {current.get(key)!r}")
    return changed


def _no_longer_recorded(key: str, current: dict[str, Any]) -> bool:
    """An 8-bit run's 4-bit-only quantization keys, which earlier versions wrote into recipe.yaml and the recipe now
    leaves out (they never applied): not a change. Any other key gone (a whole section, an entry of a free-form
    mapping such as `data.columns.roles` or `deepspeed.extra`) is one."""
    from peftkit.config.schema import FOUR_BIT_ONLY

    section, _, name = key.rpartition(".")
    return key not in current and section == "quantization" and name in FOUR_BIT_ONLY and "quantization.bits" in current


def check_resume_recipe(run_dir: Path, recipe_dump: dict[str, Any]) -> None:
    if (recipe_dump.get("adapter") or {}).get("prefix_projection"):
        from peftkit.adapters import PREFIX_PROJECTION_CHECKPOINTS
        from peftkit.train.trainer import PREFIX_ENCODER_FILE

        if recipe_dump.get("deepspeed"):
            raise RunDirError(f"--resume: {PREFIX_PROJECTION_CHECKPOINTS}, so {run_dir} cannot be resumed: start it "
                              "again with --force (a run without prefix_projection resumes)")
        latest = checkpoints.latest_loadable(run_dir)
        if latest is not None and not (latest / PREFIX_ENCODER_FILE).is_file():
            raise RunDirError(f"--resume: {latest} was saved by an earlier peftkit, which kept the prefix of a "
                              "prefix_projection run only in its projected, inference-only form, so it cannot be "
                              "trained from: start the run again with --force")
    changed = recipe_changes(run_dir, recipe_dump)
    if changed:
        raise RunDirError(
            f"--resume: the recipe differs from the one {run_dir} was started with ({'; '.join(changed)}); the "
            "checkpoint's optimizer, schedule and adapter come from that one. Resume with the same recipe and "
            "overrides, or start a new run (another output_dir, or --force)"
        )


def data_fingerprint(*row_sets: Sequence[dict[str, Any]]) -> str:
    """A hash of the tokenized rows (inputs and labels): it changes with the data files, the recipe's data settings,
    the tokenizer and the chat template."""
    digest = hashlib.sha256()
    for rows in row_sets:
        digest.update(b"|")
        for row in rows:
            digest.update(json.dumps([row["input_ids"], row["labels"]]).encode())
    return digest.hexdigest()


def check_resume_data(run_dir: Path, fingerprint: str, split: str | None = None, rows: list[int] | None = None) -> None:
    """Resuming on other data would continue the checkpoint's data order over other rows, and compare the eval loss
    measured at the start with one on another eval set. `split` (the examples on each side, `split_fingerprint`)
    decides where the run recorded it: the same examples tokenized a little differently (a chat template that
    writes today's date) resume with a warning, as long as the row counts, which the data order is drawn over, hold."""
    before = load_before(run_dir)
    started_with, started_split = before.get("data_fingerprint"), before.get("split_fingerprint")
    if started_with is None or started_with == fingerprint:
        return
    if started_split is not None and started_split == split and before.get("rows") == rows:
        log.warning("The training examples are the ones %s started with, but they tokenize differently now (a chat "
                    "template that writes the date, or another tokenizer version); resuming on them", run_dir)
        return
    raise RunDirError(
        f"--resume: the training or eval data differ from those {run_dir} was started with (a data file changed, "
        "or the tokenizer or chat template did); the checkpoint continues that data's order and the eval loss "
        "before training was measured on it. Restore the data to resume, or start a new run on the new data "
        "(another output_dir, or --force)"
    )


def check_resume_base(run_dir: Path, fingerprint: str | None, name: str) -> None:
    """The checkpoint's adapter and optimizer state belong to the base weights the run started on; on other weights
    of the same shapes (a base re-saved or fine-tuned in place, a hub model updated since) the run would go on
    without an error, and its eval loss before training would describe the other model. Checked once the weights
    have loaded: the fingerprint reads the files the load used (a hub model's are only there then)."""
    from peftkit.models.fingerprint import other_weights

    started_on = load_before(run_dir).get("base_fingerprint")
    if other_weights(started_on, fingerprint):
        raise RunDirError(
            f"--resume: the base model {name} is not the one {run_dir} was started on (its weights differ: fingerprint "
            f"{fingerprint}, started on {started_on}); the checkpoint's adapter was trained on those weights. Put "
            "the original base back to resume, or start a new run (another output_dir, or --force)"
        )


def save_before(run_dir: Path, before: dict[str, Any]) -> None:
    atomic_write_text(run_dir / BEFORE_FILE, readable_json(before))


def load_before(run_dir: Path) -> dict[str, Any]:
    """The untrained model's measurements saved when the run started; empty for runs started before they were kept."""
    path = run_dir / BEFORE_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}
