"""Records from the `datasets` library: Hub datasets (`hf:OWNER/NAME`) and `save_to_disk` folders.

A recipe names a Hub dataset as `hf:OWNER/NAME`, optionally with a config and a split:
`hf:OWNER/NAME/CONFIG:SPLIT`. The split takes `datasets`' slicing syntax, so
`hf:HuggingFaceH4/ultrachat_200k:train_sft[:2000]` trains on the first 2,000 rows. The rows then go
through the same format detection and checks as a local file. No loading script is ever run
(`datasets` 4+ has none, and peftkit never passes `trust_remote_code`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peftkit.errors import DataError

HUB_PREFIX = "hf:"
DEFAULT_SPLIT = "train"
HUB_PROBE_TIMEOUT_S = 10.0

log = logging.getLogger(__name__)


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
        with _offline_unless(hub_answers(repo)):
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


def hub_answers(repo: str) -> bool:
    """One quick request before `datasets` starts: False when the Hub cannot be reached (the dataset then loads from
    the local cache alone, instead of after a minute of retries), a clear error for an unknown or gated dataset."""
    import huggingface_hub.constants as hub_constants

    if hub_constants.HF_HUB_OFFLINE:
        return False
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        info = HfApi().dataset_info(repo, timeout=HUB_PROBE_TIMEOUT_S)
        if getattr(info, "gated", False):  # public metadata; the files need accepted terms and a token
            HfApi().auth_check(repo, repo_type="dataset")
    except GatedRepoError:
        raise DataError(f"dataset {repo} is gated on the Hugging Face Hub: accept its terms on "
                        f"https://huggingface.co/datasets/{repo} and log in here (`hf auth login`, or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise DataError(f"dataset {repo} is not on the Hugging Face Hub (or it is private: log in with `hf auth "
                        "login`); check the name in hf:OWNER/NAME") from None
    except HfHubHTTPError as exc:  # the Hub answered with another error (rate limit, outage): let `datasets` try
        log.debug("hub check of dataset %s: %s", repo, exc)
    except Exception as exc:  # no connection (DNS, proxy, timeout): the transport's own error classes vary
        log.debug("hub check of dataset %s: %s", repo, exc)
        return False
    return True


@contextlib.contextmanager
def _offline_unless(online: bool) -> Iterator[None]:
    """`datasets` and `huggingface_hub` in offline mode for the duration (their cache only, no retries)."""
    if online:
        yield
        return
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` (one split) or `DatasetDict.save_to_disk`."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


_SAID_SPLITS: set[str] = set()


def saved_dataset_records(path: Path) -> list[tuple[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (KeyError, ValueError, OSError, FileNotFoundError) as exc:  # a folder written in part, or edited by hand
        raise DataError(f"{path}: not a readable `datasets` save_to_disk folder ({type(exc).__name__}: {exc}); save "
                        "it again with `Dataset.save_to_disk`, or export the data to JSON Lines") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if DEFAULT_SPLIT not in loaded:
            raise DataError(f"{path} holds the splits {', '.join(splits)} and no `train`; point the recipe at "
                            f"one of them: {path / splits[0]}")
        if len(splits) > 1 and str(path) not in _SAID_SPLITS:  # as LLaMA-Factory and axolotl read it: `train`
            _SAID_SPLITS.add(str(path))  # once: validation, the split and --show-data each read the folder
            others = [split for split in splits if split != DEFAULT_SPLIT]
            log.info("%s holds the splits %s: reading `%s` (for another split point at its folder, e.g. %s)", path,
                     ", ".join(splits), DEFAULT_SPLIT, path / others[0])
        loaded = loaded[DEFAULT_SPLIT]
    return _located(str(path), loaded)


def _located(name: str, rows: Any) -> list[tuple[str, Any]]:
    return [(f"{name}:row {i + 1}", row) for i, row in enumerate(rows)]
