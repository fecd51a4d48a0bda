"""Write a merged model as a standard Hugging Face model directory, verified in a fresh process.

Layout: safetensors weights (one `model.safetensors`, or `model-0000x-of-0000y.safetensors` shards +
`model.safetensors.index.json` once the model exceeds --shard-size, as `save_pretrained` does),
`config.json`, `generation_config.json`, the tokenizer files with the chat template, `README.md`
(model card) and `verification.json`. Written into a temporary sibling and renamed when complete.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from peftkit.errors import ExportError
from peftkit.export import verify
from peftkit.export.card import merged_card
from peftkit.export import output_lock
from peftkit.export.common import (DTYPE_NAMES, ExportResult, check_room, disk_full_as_error, list_files, prepare_output,
                                   save_failed_report, write_verification)
from peftkit.export.merge import (
    FULL_MODEL, MergedModel, QLoraBase, check_merge_in_memory, combine_runs, shipped_model,
)
from peftkit.models.load import save_tokenizer
from peftkit.utils.atomic import atomic_directory, atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = "2GB"


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPE_NAMES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return getattr(torch, name)


def export_dtype(name: str, base_config: Any) -> str:
    """`auto`: the base model's own dtype (a bf16 base stays bf16, half the size of float32), float32 when its config
    names none (the merge itself is always done in float32)."""
    if name != "auto":
        _dtype(name)
        return name
    own = getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None)
    own = str(own).removeprefix("torch.") if own is not None else "float32"
    return own if own in DTYPE_NAMES else "float32"


def save_model_dir(model: Any, tokenizer: Any, folder: Path, *, dtype: str, shard_size: int) -> None:
    """config + generation config + safetensors shards + tokenizer (with chat template) into `folder`.

    A half-precision export casts a copy, so the caller's float32 model stays usable (e.g. for GGUF)."""
    if _dtype(dtype) != next(model.parameters()).dtype:
        model = copy.deepcopy(model).to(_dtype(dtype))
    model.config.dtype = dtype
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        from peftkit.evaluate.generation import stop_token_ids

        stops = stop_token_ids(model, tokenizer)  # with the template's end-of-turn: plain `generate` stops there
        if stops:
            generation.eos_token_id = stops[0] if len(stops) == 1 else stops
        if generation.pad_token_id is None and tokenizer.pad_token_id is not None:
            generation.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(folder), max_shard_size=shard_size, safe_serialization=True)
    if generation is not None and not (folder / "generation_config.json").is_file():
        generation.save_pretrained(str(folder))
    save_tokenizer(tokenizer, folder)
    if not getattr(tokenizer, "chat_template", None):
        log.warning("The tokenizer has no chat template; the export will not format conversations by itself")


@output_lock.releases_claims
def write_merged(merged: MergedModel, out: Path, *, dtype: str = "auto", shard_size: int = 2 * 10**9,
                 force: bool = False, check: bool = True) -> ExportResult:
    """Save `merged` to `out` atomically; with `check`, reload it in a fresh process and compare first."""
    protected = [r.run_dir for r in merged.runs]
    out = prepare_output(out, force=force, protected=protected)
    if check:
        check_merge_in_memory(merged)
    dtype = export_dtype(dtype, merged.primary.base_config)
    check_room(out, merged.model, dtype, "merged model")
    report = None
    with disk_full_as_error(out), atomic_directory(out, replace=force) as tmp:
        assert tmp is not None
        save_model_dir(merged.model, merged.tokenizer, tmp, dtype=dtype, shard_size=shard_size)
        if check:
            trust = merged.primary.model_cfg.trust_remote_code
            report = verify.judge(verify.run_child("hf", tmp, merged.reference, trust_remote_code=trust), dtype)
            report["in_memory_merge_max_abs_diff"] = merged.merge_max_abs_diff
            if merged.qlora:
                report["qlora"] = merged.qlora
            if not report["passed"]:
                failed = save_failed_report(out, report)
                verify.enforce({**report, "failures": [*report["failures"], f"details in {failed}"]}, "merged model")
            report = write_verification(tmp, out, report)
        atomic_write_text(tmp / "README.md", merged_card(merged, dtype=dtype, verification=report, out=out))
    adapters = [run for run in merged.runs if run.info.peft_type != FULL_MODEL]  # full / partial: nothing was merged
    notes = [f"merged vs unmerged adapter (in memory, float32): max |logit diff| {merged.merge_max_abs_diff:.3g}"] * bool(adapters)
    return ExportResult(out, "hf", list_files(out), report, merged.qlora, notes)


def check_shard_size(shard_size: int) -> None:
    """transformers takes a size <= 0 as "every tensor its own shard"; say so before minutes of loading."""
    if isinstance(shard_size, (int, float)) and shard_size <= 0:
        raise ExportError(f"shard_size must be a positive number of bytes (e.g. 2 * 10**9 for 2GB), got {shard_size!r}")


@output_lock.releases_claims
def export_hf(run_dir: str | Path, out: str | Path | None = None, *, dtype: str = "auto",
              shard_size: int = 2 * 10**9, force: bool = False, check: bool = True,
              qlora_base: QLoraBase = "dequantized", base: str | None = None) -> ExportResult:
    """`peftkit merge RUN_DIR` / `peftkit export RUN_DIR --format hf`. A full / partial run has nothing to merge:
    its trained model is written the same way (with tokenizer, chat template, model card and verification)."""
    run_dir = Path(run_dir).expanduser().resolve()
    target = Path(out) if out else run_dir / "merged"
    export_dtype(dtype, None)  # a wrong name fails before any loading
    check_shard_size(shard_size)
    prepare_output(target, force=force, protected=[run_dir])  # fail before minutes of loading, not after
    merged = shipped_model(run_dir, qlora_base=qlora_base, base=base)
    return write_merged(merged, target, dtype=dtype, shard_size=shard_size, force=force, check=check)


@output_lock.releases_claims
def export_combined(run_dirs: list[str | Path], out: str | Path, *, weights: list[float] | None = None,
                    combination: str = "cat", dtype: str = "auto", shard_size: int = 2 * 10**9,
                    force: bool = False, check: bool = True, base: str | None = None,
                    qlora_base: QLoraBase = "dequantized") -> ExportResult:
    """`peftkit merge --adapters RUN_A RUN_B --weights 0.7 0.3 --out DIR`."""
    export_dtype(dtype, None)  # a wrong name fails before any loading
    check_shard_size(shard_size)
    prepare_output(Path(out), force=force, protected=[Path(r) for r in run_dirs])
    merged = combine_runs(run_dirs, weights, combination=combination, base=base, qlora_base=qlora_base)
    return write_merged(merged, Path(out), dtype=dtype, shard_size=shard_size, force=force, check=check)
