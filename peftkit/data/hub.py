"""Records from the `datasets` library: Hub datasets (`hf:OWNER/NAME`) and `save_to_disk` folders.

A recipe names a Hub dataset as `hf:OWNER/NAME`, optionally with a config and a split:
`hf:OWNER/NAME/CONFIG:SPLIT`. The split takes `datasets`' slicing syntax, so
`hf:HuggingFaceH4/ultrachat_200k:train_sft[:2000]` trains on the first 2,000 rows. The rows then go
through the same format detection and checks as a local file. No loading script is ever run
(`datasets` 4+ has none, and peftkit never passes `trust_remote_code`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftkit.errors import DataError

HUB_PREFIX = "hf:"
DEFAULT_SPLIT = "train"


def is_hub_ref(value: str | Path) -> bool:
    return str(value).startswith(HUB_PREFIX)


def parse_hub_ref(ref: str) -> tuple[str, str | None, str]:
    """`hf:OWNER/NAME[/CONFIG][:SPLIT]` -> (repo id, config or None, split)."""
    body = ref.removeprefix(HUB_PREFIX)
    body, _, split = body.partition(":")
    parts = body.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise DataError(
            f"{ref!r} is not a Hub dataset reference; write hf:OWNER/NAME, hf:OWNER/NAME:SPLIT or "
            "hf:OWNER/NAME/CONFIG:SPLIT (e.g. hf:HuggingFaceH4/no_robots:train)"
        )
    return "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None), split or DEFAULT_SPLIT


def hub_records(ref: str) -> list[tuple[str, Any]]:
    """The rows of a Hub dataset split, each with a `hf:...:row N` location for error messages."""
    import datasets

    repo, config, split = parse_hub_ref(ref)
    try:
        rows = datasets.load_dataset(repo, config, split=split)
    except ConnectionError as exc:
        raise DataError(
            f"could not reach the Hub for dataset {repo} ({exc}). Run once while online (it is then cached), or on a "
            f"machine with internet run `hf download {repo} --repo-type dataset --local-dir DIR`, copy "
            "DIR here and point the recipe at its data file (e.g. DIR/data/train-00000-of-00001.parquet)"
        ) from None
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetsError) as exc:
        # not found / private (FileNotFoundError), unknown split or config (ValueError)
        raise DataError(f"could not load Hub dataset {repo} (config {config}, split {split!r}): {exc}") from None
    return _located(ref, rows)


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` (one split) or `DatasetDict.save_to_disk`."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def saved_dataset_records(path: Path) -> list[tuple[str, Any]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if DEFAULT_SPLIT not in loaded:
            raise DataError(f"{path} holds the splits {', '.join(splits)} and no `train`; point the recipe at "
                            f"one of them: {path / splits[0]}")
        loaded = loaded[DEFAULT_SPLIT]
    return _located(str(path), loaded)


def _located(name: str, rows: Any) -> list[tuple[str, Any]]:
    return [(f"{name}:row {i + 1}", row) for i, row in enumerate(rows)]
