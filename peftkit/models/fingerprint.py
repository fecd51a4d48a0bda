"""A fingerprint of a base model's weight files, to notice an adapter put on weights it was not trained on.

Two models of one architecture (a base and its fine-tune, or a checkpoint edited in place) load into the same
shapes, so a merge onto the wrong one raises nothing, and its verification compares against the same wrong base.
The fingerprint hashes the stored bytes of the normalisation weights, a sample of embedding rows and the first row
of every other weight matrix (a LoRA merged into the linear layers changes those rows, and nothing else: version 1,
without them, missed it); read from the files, so the dtype or quantization a run loads in does not matter.
Version 2 is written `v2-` + 16 hex digits; a run recorded with version 1 (16 hex digits) is compared in version 1.
Pickled `.bin` weights are not unpickled just for this: their fingerprint (`bin-`) hashes the files' sizes and
evenly spaced blocks of their bytes, which any edit of the dense weights reaches.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from peftkit.models.safetensors_files import weight_files

log = logging.getLogger(__name__)

EMBEDDING_ROWS = 256
BIN_BLOCKS, BIN_BLOCK_BYTES = 64, 1 << 16


def _bin_fingerprint(files: list[Path]) -> str | None:
    digest = hashlib.sha256()
    try:
        for path in files:
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with path.open("rb") as handle:
                for block in range(BIN_BLOCKS):
                    handle.seek(max(0, size - BIN_BLOCK_BYTES) * block // (BIN_BLOCKS - 1))
                    digest.update(handle.read(BIN_BLOCK_BYTES))
    except OSError as exc:
        log.debug("no fingerprint for %s: %s", files[0].parent, exc)
        return None
    return "bin-" + digest.hexdigest()[:16]


def files_fingerprint(folder: str | Path, version: int = 2) -> str | None:
    """`v2-` + 16 hex digits (version 1: the digits alone; `bin-` for pickled `.bin` weights), or None where there
    are no weight files to read (a hub id not in the local cache)."""
    import torch
    from safetensors import safe_open

    folder = Path(folder)
    files = weight_files(folder) if folder.is_dir() else []
    if not files:
        bins = sorted(folder.glob("pytorch_model*.bin")) if folder.is_dir() else []
        return _bin_fingerprint(bins) if bins and version >= 2 else None
    digest = hashlib.sha256()
    try:
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                for key in sorted(handle.keys()):
                    shape = handle.get_slice(key).get_shape()
                    if len(shape) == 1 and "norm" in key.lower():
                        tensor = handle.get_tensor(key)
                    elif len(shape) == 2 and "embed" in key.lower():
                        tensor = handle.get_slice(key)[:: max(1, shape[0] // EMBEDDING_ROWS)]
                    elif version >= 2 and shape:  # biases whole, matrices' first row, stacked experts' first row
                        tensor = handle.get_slice(key)[tuple(slice(0, 1) for _ in shape[:-1])]
                    else:
                        continue
                    digest.update(key.encode())
                    digest.update(tensor.contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    except Exception as exc:  # an unreadable file: no fingerprint, the load itself will say what is wrong
        log.debug("no fingerprint for %s: %s", folder, exc)
        return None
    return ("v2-" if version >= 2 else "") + digest.hexdigest()[:16]


BASE_CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


def base_config_summary(config: Any) -> dict[str, Any]:
    """What a run records of its base's config (summary.json `base_config`), since the base's folder may change
    later and an adapter that no longer fits should be told what it was trained on."""
    return {key: getattr(config, key, None) for key in BASE_CONFIG_KEYS}


def source_fingerprint(source: object, version: int = 2) -> str | None:
    """The fingerprint of a resolved model reference (`ModelSource`): its folder, or its files in the hub cache."""
    from peftkit.models.resolve import materialize

    try:
        target = materialize(source)  # type: ignore[arg-type]
        if not Path(target).is_dir():
            from huggingface_hub import snapshot_download

            target = snapshot_download(target, revision=getattr(source, "revision", None), local_files_only=True)
    except Exception as exc:  # not cached, offline: nothing to compare
        log.debug("no fingerprint for %s: %s", source, exc)
        return None
    return files_fingerprint(target, version)


def _kind(fingerprint: str) -> str:
    """`v1` (bare digits), `v2` or `bin`."""
    return fingerprint.split("-")[0] if "-" in fingerprint else "v1"


def other_weights(recorded: str | None, now: str | None) -> bool:
    """Whether two fingerprints show other weights: both known, of one kind (a .bin base since saved as safetensors,
    `bin-` against `v2-`, is not comparable), and different."""
    return bool(recorded and now and _kind(recorded) == _kind(now) and recorded != now)


def warn_if_other_base(run_dir: Path, source: object, name: str) -> bool:
    """Warn when `source` is not the base the run in `run_dir` was trained on (its summary's fingerprint); True
    when they differ."""
    summary = run_dir / "summary.json"
    try:
        trained = json.loads(summary.read_text(encoding="utf-8")).get("base_fingerprint")
    except (OSError, ValueError):
        return False
    if not trained:
        return False
    now = source_fingerprint(source, 1 if _kind(trained) == "v1" else 2)
    # a .bin base since saved as safetensors (`bin-` against `v2-`) is not comparable
    if other_weights(trained, now):
        log.warning("The base model %s is not the one %s was trained on (its weights differ, fingerprint %s, "
                    "trained on %s): the adapter will be applied to other weights, and verification compares "
                    "against those same weights. Use the original base unless this is intended.", name, run_dir, now,
                    trained)
        return True
    return False
