"""Turn a `.gguf` file into a cached, plain safetensors model directory (once).

transformers loads GGUF by dequantizing every tensor (~20 s for 135M parameters) and marks the
result as quantized, which blocks `save_pretrained`. We rebuild a clean model from the config,
copy the dequantized weights in, and save that: later loads take a fraction of a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from peftkit.errors import ModelNotFoundError, PeftkitError
from peftkit.models.load import save_tokenizer
from peftkit.utils.atomic import atomic_directory, atomic_write_text, write_problem

log = logging.getLogger(__name__)


def gguf_architecture(path: Path) -> str:
    """Read `general.architecture` from the GGUF header without loading tensors."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a usable GGUF"
        raise PeftkitError(f"{path} is not a readable GGUF file ({exc}): cut short (an incomplete download or copy) "
                           "or not a GGUF at all; re-download or re-export it") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise PeftkitError(f"{path} has no `general.architecture` metadata; it is not a model GGUF file")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


GGUF_ARCHITECTURE_NAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                           "minimax-m2": "minimax_m2", "t5encoder": "t5"}
"""llama.cpp's architecture names that transformers' GGUF loader knows under its own model type."""
NOT_ARCHITECTURES = ("general", "tokenizer")  # in transformers' list of GGUF mappings, not model types
ENCODER_DECODER = ("t5", "umt5")


def check_gguf_supported(path: Path) -> str:
    """The file's model type, where transformers' GGUF loader reads it and it is a decoder peftkit trains."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    written = gguf_architecture(path)
    arch = GGUF_ARCHITECTURE_NAMES.get(written, written)
    if arch in ENCODER_DECODER:
        raise PeftkitError(f"{path.name} is a `{written}` GGUF, an encoder-decoder (text-to-text) model; peftkit trains "
                           "decoder-only chat models (causal LMs): use one of those")
    if arch not in GGUF_SUPPORTED_ARCHITECTURES or arch in NOT_ARCHITECTURES:
        known = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - set(NOT_ARCHITECTURES) - set(ENCODER_DECODER))
        raise PeftkitError(
            f"{path.name} is a `{written}` GGUF, which transformers cannot load (it reads: {', '.join(known)}); use "
            "the original Hugging Face checkpoint instead"
        )
    return arch


FINGERPRINTS_FILE = "gguf_fingerprints.json"
"""In the cache's models/ folder: each GGUF's content hash by path, size and modification time."""


def _fingerprint(path: Path, cache_root: Path) -> str:
    """The first 12 hex digits of the file's sha256, remembered while its inode, size, modification and change times
    stay the same (a copy with its timestamps kept, `cp -p`, still changes the change time): every command resolves
    the model, and hashing a 7B GGUF takes about 10 s."""
    key, seen = str(path.resolve()), _file_state(path)
    index_path = cache_root / "models" / FINGERPRINTS_FILE
    index = _fingerprint_index(index_path.parent)
    entry = index.get(key)
    if isinstance(entry, dict) and entry.get("stat") == seen and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    fingerprint = digest.hexdigest()[:12]
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(index_path, json.dumps({**index, key: {"stat": seen, "sha256": fingerprint}}, indent=1))
    except OSError:  # a read-only cache: hashed again next time
        pass
    return fingerprint


def _file_state(path: Path) -> list[int]:
    """What the hash is remembered by: inode, size, modification and change times."""
    stat = path.stat()
    return [stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _fingerprint_index(models_dir: Path) -> dict[str, Any]:
    try:
        index = json.loads((models_dir / FINGERPRINTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _converted(models_dir: Path, stem: str, fingerprint: str) -> Path:
    """The conversion a file of `fingerprint` named `stem` uses: its own, else the first current one of the same
    content under another name, else its own (still to be made)."""
    own = models_dir / f"{stem}-{fingerprint}"
    if conversion_is_current(own):
        return own
    return next((f for f in sorted(models_dir.glob(f"*-{fingerprint}")) if conversion_is_current(f)), own)


def cached_model_dir(gguf_path: Path, cache_root: Path) -> Path:
    """Where `gguf_path`'s conversion is cached: `<stem>-<fingerprint>`, or the conversion of the same file under
    another name (a copy, a rename) when that one is there and this name's is not."""
    return _converted(cache_root / "models", gguf_path.stem, _fingerprint(gguf_path, cache_root))


def files_served_by(folder: Path) -> list[str]:
    """GGUF files that the conversion `folder` serves under another name (`peftkit models`): in the hash index with
    its content, unchanged since they were hashed, and using `folder` (cached_model_dir's choice for them)."""
    fingerprint = folder.name.rsplit("-", 1)[-1]
    found = []
    for path, entry in _fingerprint_index(folder.parent).items():
        stem = Path(path).stem
        if not isinstance(entry, dict) or entry.get("sha256") != fingerprint or f"{stem}-{fingerprint}" == folder.name:
            continue  # another file's, or this folder's own name
        with contextlib.suppress(OSError):
            if entry.get("stat") == _file_state(Path(path)) and _converted(folder.parent, stem, fingerprint) == folder:
                found.append(path)
    return sorted(found)


CONVERSION_VERSION = 3
"""Bumped when a conversion would come out differently: 2 reads what transformers' GGUF loader skips
(`gguf_config.converted_config`), 3 also StarCoder2's / StableLM's RoPE base and rotary share and GPT-2's context
length; older cached conversions are redone once."""


def conversion_is_current(target: Path) -> bool:
    marker = target / "peftkit_source.json"
    if not (target / "config.json").is_file() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("conversion", 1) >= CONVERSION_VERSION
    except (OSError, ValueError):
        return False


TOKENIZER_PROBE = "Hello, world!\nThe 2 cats sat on the mat (3.5 m) at 10:30."


def check_tokenizer_reads_back(tokenizer: Any, gguf_path: Path) -> None:
    """transformers rebuilds a GGUF's tokenizer by architecture; for a vocabulary that architecture does not
    usually have (a byte-level one in a Gemma file) the saved and reloaded tokenizer maps spaces and newlines to
    `<unk>`, and training would quietly learn from that. Plain text must come back from its own tokens."""
    ids = tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    back = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    unknown = tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids
    if unknown or back.strip() != TOKENIZER_PROBE:
        raise PeftkitError(
            f"transformers cannot read the tokenizer in {gguf_path.name} correctly: {TOKENIZER_PROBE!r} comes back as "
            f"{back!r}{' (unknown tokens)' if unknown else ''}. Train from the original model instead: its folder with "
            "tokenizer.json, or its hub id"
        )


def warn_if_embedding_model(path: Path) -> None:
    """A GGUF that sets a pooling type (llama.cpp's `--embedding` models: GTE, Qwen3-Embedding, ...) describes a text
    encoder, whose weights peftkit would train as a chat model's without a word."""
    from peftkit.models.gguf_config import gguf_header

    metadata, _ = gguf_header(path)
    pooling = metadata.get(f"{metadata.get('general.architecture')}.pooling_type")
    if pooling not in (None, 0):  # 0: none
        log.warning("%s describes an embedding model (pooling_type %s): peftkit trains it as a chat model (causal "
                    "LM), which it was not made for; for embeddings use the original checkpoint with a "
                    "sentence-embedding trainer", path.name, pooling)


def check_weights_read(model: Any, info: dict[str, Any], gguf_path: Path) -> None:
    """Every weight the model needs came from the file, and none is NaN or infinite: transformers initialises the
    weights a file lacks at random without a word (a damaged file trained as if whole), and a NaN in the file
    surfaced as a diverged loss at the first step, blamed on the learning rate."""
    import torch

    missing = list(info.get("missing_keys") or [])
    if missing:
        raise PeftkitError(f"{gguf_path.name} lacks {len(missing)} weight(s) its {model.config.model_type} model needs "
                           f"(first: {', '.join(missing[:3])}): the file is incomplete or damaged, or written by a tool "
                           "transformers does not read whole; re-download or re-export it, or use the original Hugging "
                           "Face checkpoint")
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise PeftkitError(f"{gguf_path.name}: the weights of `{name}` hold NaN or infinite values: the file is "
                               "damaged; re-download or re-export it")


def convert_gguf(gguf_path: Path, cache_root: Path) -> Path:
    """Return the cached model directory for `gguf_path`, converting it on first use."""
    if not gguf_path.is_file():
        raise ModelNotFoundError(f"GGUF file {gguf_path} does not exist")
    target = cached_model_dir(gguf_path, cache_root)
    if conversion_is_current(target):
        return target
    stale = target.exists()
    check_gguf_supported(gguf_path)
    problem = write_problem(target)  # before minutes of conversion, not after
    if problem:
        raise PeftkitError(f"cannot cache the converted model of {gguf_path.name}: {problem}. Converted models are "
                           f"kept under $PEFTKIT_HOME (now {cache_root}, default ~/.cache/peftkit): set "
                           "PEFTKIT_HOME to a writable folder")
    log.info("Converting %s to safetensors (once; cached in %s)", gguf_path.name, target)
    warn_if_embedding_model(gguf_path)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.models.gguf_config import converted_config

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with tempfile.TemporaryDirectory(prefix="peftkit-tokenizer-") as probe:  # as training will load it: saved
        save_tokenizer(tokenizer, Path(probe))
        check_tokenizer_reads_back(AutoTokenizer.from_pretrained(probe), gguf_path)
    # transformers' loader leaves some settings at its defaults (head size, Gemma's, RoPE scaling): the model is
    # built with what llama.cpp reads from the file, so training starts from the model the file describes
    loaded, info = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                        config=converted_config(gguf_path), output_loading_info=True)
    check_weights_read(loaded, info, gguf_path)
    config = loaded.config
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.name_or_path = gguf_path.stem
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), assign=True)
    clean.tie_weights()
    clean.generation_config = loaded.generation_config
    with atomic_directory(target, exist_ok=True, replace=stale) as tmp:
        if tmp is None:  # another process finished first
            return target
        clean.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        (tmp / "peftkit_source.json").write_text(json.dumps(
            {"converted_from": str(gguf_path), "fingerprint": target.name.rsplit("-", 1)[-1],
             "conversion": CONVERSION_VERSION}, indent=2))
    return target
