"""Resolve a recipe's model reference to something transformers can load, without loading weights.

A reference is one of: a built-in name, a local Hugging Face model directory, a `.gguf` file,
or a hub id. Problems (missing path, not a model directory, pickle-only weights, offline hub
id) are reported here, before any expensive work.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from peftkit.errors import ModelNotFoundError, PeftkitError
from peftkit.models.registry import BUILTINS, peftkit_home
from peftkit.utils.command_name import command

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
HUB_PROBE_TIMEOUT_S = 10.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    ref: str
    kind: Literal["builtin", "local", "gguf", "hub"]
    path: Path | None = None
    """Local directory or .gguf file (None for hub ids, except the cached snapshot when the hub cannot be reached)."""
    revision: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.path is not None and self.path.suffix == ".gguf"


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.endswith(".gguf") or os.sep in ref.strip("/").split("/", 1)[-1]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tekken.json", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def _no_tokenizer_files(path: Path) -> str | None:
    """What a model folder without any tokenizer file lacks: transformers then fails with advice to install
    sentencepiece, which would not help."""
    if not path.is_dir() or any((path / name).is_file() for name in TOKENIZER_FILES) or any(path.glob("*.tiktoken")):
        return None
    return f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)"


def tokenizer_files_problem(source: ModelSource) -> str | None:
    """A local model directory without any tokenizer file, and what to do."""
    missing = _no_tokenizer_files(source.path) if source.path is not None else None
    return f"{missing}: copy them from the model it was saved from (`tokenizer.save_pretrained(DIR)`)" if missing else None


def _check_model_dir(path: Path, allow_pickle: bool) -> None:
    is_run = (path / "recipe.yaml").is_file() and ((path / "adapter").is_dir() or (path / "summary.json").is_file())
    if not (path / "config.json").is_file() and (is_run or (path / "adapter_config.json").is_file()):
        raise ModelNotFoundError(
            f"{path} is a {'peftkit run' if is_run else 'PEFT adapter'} directory, not a base model: point model.name "
            "at the base model it was trained on (the run's recipe.yaml `model.name`), or make a full model of it "
            f"with `{command('merge', 'RUN_DIR')}` and point model.name at that"
        )
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if ggufs:
            raise ModelNotFoundError(f"{path} is not a Hugging Face model directory (it has no config.json) but holds "
                                     f"{', '.join(ggufs[:3])}: point model.name at the .gguf file itself")
        raise ModelNotFoundError(
            f"{path} is not a Hugging Face model directory (it has no config.json); point model.name at a "
            f"directory saved with save_pretrained, a .gguf file, or a built-in name (`{command('models')}`)"
        )
    has_safetensors = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt"))
    if not has_safetensors and has_pickle and not allow_pickle:
        raise PeftkitError(
            f"{path} has only pickle weights (.bin), which can run arbitrary code when loaded; convert them to "
            "safetensors, or set `model.allow_pickle: true` if you trust this model"
        )
    if not has_safetensors and not has_pickle:
        raise ModelNotFoundError(f"{path} has a config.json but no weight files (*.safetensors)")
    missing = _missing_shards(path, "model.safetensors.index.json" if has_safetensors else "pytorch_model.bin.index.json")
    if missing:
        raise ModelNotFoundError(f"{path} lacks {len(missing)} weight shard(s) its index lists ({', '.join(missing[:3])}"
                                 f"{', ...' if len(missing) > 3 else ''}): copy the model again, completely")


def _missing_shards(path: Path, index_name: str) -> list[str]:
    """Shards the index of the format that loads (safetensors where there are any) names that are not there (a copy
    or download cut short): found when the weights load otherwise, by every process of a launch. The other format's
    index is left alone: a download of the safetensors alone often keeps both indexes. A single `model.safetensors`
    loads without its index."""
    if index_name.startswith("model.safetensors") and (path / "model.safetensors").is_file():
        return []
    try:
        shards = set(json.loads((path / index_name).read_text(encoding="utf-8")).get("weight_map", {}).values())
    except (OSError, ValueError, AttributeError, TypeError):
        return []  # absent, or unreadable: transformers says what is wrong with it
    return sorted(name for name in shards if isinstance(name, str) and not (path / name).is_file())


def _hub_cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return isinstance(found, str)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def resolve_model_ref(ref: str, *, revision: str | None = None, allow_pickle: bool = False) -> ModelSource:
    """Where a model name points: a built-in name, a local directory, a .gguf file (converted once into the cache)
    or a hub id (the local hub cache when offline); a reference that resolves nowhere is one message saying why."""
    if ref in BUILTINS:
        return ModelSource(ref, "builtin", BUILTINS[ref].locate(), revision)
    path = Path(ref).expanduser()
    if path.exists():
        if path.is_dir():
            _check_model_dir(path, allow_pickle)
            return ModelSource(ref, "local", path.resolve(), revision)
        if path.suffix == ".gguf":
            return ModelSource(ref, "gguf", path.resolve(), revision)
        raise ModelNotFoundError(f"{path} is a file but not a .gguf model; model.name must be a directory, .gguf or hub id")
    if _looks_like_path(ref) or not HUB_ID.match(ref):
        from peftkit.config.load import unset_variable_message

        if unset := unset_variable_message(ref):
            raise ModelNotFoundError(f"model path {ref!r} does not exist: {unset}")
        raise ModelNotFoundError(
            f"model path {ref!r} does not exist; {_did_you_mean(Path(ref).name)}built-in models are: "
            f"{', '.join(BUILTINS)} (see `{command('models')}`)"
        )
    if not _hub_cached(ref, revision):
        if offline():
            raise ModelNotFoundError(hub_hint(ref, revision))
        check_on_hub(ref, revision)
    elif offline():
        _cached_snapshot(ref, revision, allow_pickle)  # what is missing from it is said now, not after loading starts
    elif not _hub_answers(ref) and (snapshot := _cached_snapshot(ref, revision, allow_pickle)) is not None:
        # transformers would retry every optional file of the cached model against the unreachable hub (minutes of
        # `Retrying in Ns` lines): the cached snapshot folder loads as a local model instead, with no request at all.
        log.warning("the Hugging Face hub cannot be reached: %s loads from its cached copy %s (set HF_HUB_OFFLINE=1 "
                    "to skip this check)", ref, snapshot)
        return ModelSource(ref, "hub", snapshot, revision)
    return ModelSource(ref, "hub", None, revision)


def _cached_snapshot(ref: str, revision: str | None, allow_pickle: bool) -> Path | None:
    """The cached snapshot folder of a hub model that cannot be fetched now, checked as a local model folder
    (None where the cache layout does not give one: transformers' own lookup then decides)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(ref, revision=revision, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - the cache library's errors for a partial layout vary
        log.debug("no cached snapshot folder for %s: %s", ref, exc)
        return None
    try:
        _check_model_dir(snapshot, allow_pickle)
        if missing := _no_tokenizer_files(snapshot):  # transformers' error would advise installing sentencepiece
            raise ModelNotFoundError(missing)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"the cached copy of {ref} is incomplete ({exc}) and the hub cannot be reached. "
                                 f"{_capitalized(hub_hint(ref, revision))}") from None
    return snapshot


@functools.lru_cache(maxsize=None)
def _hub_answers(ref: str) -> bool:
    """One quick request per model and process: whether the hub answers at all (any HTTP answer counts, a private
    repository's too)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi().model_info(ref, timeout=HUB_PROBE_TIMEOUT_S)
    except HfHubHTTPError:
        return True
    except Exception as exc:  # no connection (DNS, proxy, timeout): the transport's own error classes vary
        log.debug("hub check of %s: %s", ref, exc)
        return False
    return True


def _did_you_mean(ref: str) -> str:
    """A built-in name close to `ref` (a typo); for a hub id `OWNER/NAME`, one whose name is NAME."""
    if "/" in ref:
        name = ref.rsplit("/", 1)[-1].lower()
        close = [builtin for builtin in BUILTINS if builtin == name]
    else:
        close = [builtin for builtin in BUILTINS if builtin.startswith(ref.lower())]  # `smollm2-135m`
        close = close or difflib.get_close_matches(ref.lower(), list(BUILTINS), n=1, cutoff=0.75)
    return f"did you mean the built-in `{close[0]}`? " if close else ""


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def hub_hint(ref: str, revision: str | None = None) -> str:
    at, flag = (f" at revision {revision!r}", f" --revision {revision}") if revision else ("", "")
    repo = ref if "/" in ref else f"OWNER/{ref}"  # a Hub id names its owner
    return (
        f"model {ref!r}{at} is not a built-in name or a local path, and it cannot be fetched from the Hugging Face hub "
        f"here (offline or not in the cache). {_capitalized(_did_you_mean(ref))}On a machine with internet run "
        f"`hf download {repo}{flag} --local-dir DIR`, copy DIR here and set `model.name: DIR`; "
        f"built-in models: {', '.join(BUILTINS)}"
    )


def check_on_hub(ref: str, revision: str | None) -> None:
    """One quick request before anything downloads: an unreachable hub, an unknown or gated repository, or a
    wrong revision is said in one line here, instead of after the download library's retries."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    gated = ModelNotFoundError(
        f"model {ref!r} is gated on the Hugging Face hub: accept its license on https://huggingface.co/{ref} "
        "and log in here (`hf auth login`, or set HF_TOKEN)")
    try:
        info = HfApi().model_info(ref, revision=revision, timeout=HUB_PROBE_TIMEOUT_S)
        if getattr(info, "gated", False):  # public metadata; the files need an accepted license and a token
            HfApi().auth_check(ref)
    except GatedRepoError:
        raise gated from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"model {ref!r} is not on the Hugging Face hub (or it is private: log in with `hf auth login`); "
            f"{_did_you_mean(ref)}built-in models: {', '.join(BUILTINS)}; a local model is a directory path") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"model {ref!r} has no revision {revision!r} on the hub; fix model.revision") from None
    except HfHubHTTPError as exc:  # the hub answered with another error (rate limit, outage): let the download try
        log.debug("hub check of %s: %s", ref, exc)
    except Exception as exc:  # no connection (DNS, proxy, timeout): the transport's own error classes vary
        log.debug("hub check of %s: %s", ref, exc)
        raise ModelNotFoundError(hub_hint(ref, revision)) from None


def materialize(source: ModelSource) -> str:
    """A `from_pretrained` argument for `source`; converts GGUF files into the cache on first use."""
    if source.path is None:
        return source.ref
    if source.is_gguf:
        from peftkit.models.gguf_convert import convert_gguf

        return str(convert_gguf(source.path, peftkit_home()))
    return str(source.path)


def needs_remote_code(exc: BaseException) -> bool:
    """transformers' refusal to load a model whose code ships with its weights (`trust_remote_code` is off)."""
    return isinstance(exc, ValueError) and "trust_remote_code" in str(exc)


def remote_code_error(ref: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {ref!r} needs its own Python code to load (its config names custom classes), and peftkit does not "
        "run code that comes with a model unless the recipe allows it. If you trust its source, set "
        "`model.trust_remote_code: true`; otherwise use a model that transformers supports natively")
