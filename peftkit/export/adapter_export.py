"""The adapter alone, in standard PEFT layout, with a manifest saying what it needs and who can serve it.

Files: adapter_config.json + adapter_model.safetensors (as peft saves them), the run's tokenizer files
(they carry the chat template the adapter was trained with), manifest.json, README.md, verification.json.

Works for every peft method (prefix tuning included): nothing is merged. Verification loads the
copy with upstream `peft.PeftModel.from_pretrained` onto the base in a fresh process and compares
logits with the adapter as peftkit loads it.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from peftkit import __version__
from peftkit.data.classification import read_labels
from peftkit.errors import ExportError
from peftkit.export import verify
from peftkit.export.card import adapter_card, bnb_kwargs, classifier_loading
from peftkit.export import output_lock
from peftkit.export.common import (ExportResult, disk_full_as_error, list_files, prepare_output, save_failed_report,
                                   write_json, write_verification)
from peftkit.export.compat import serving_compatibility, vllm_quantized_base_note
from peftkit.export.merge import FULL_MODEL, RunAdapter, _attach, _load_base, _reference, load_run_tokenizer, resolve_run
from peftkit.models.load import default_skips, save_tokenizer, unquantized_modules
from peftkit.runs import trained_quantization
from peftkit.utils.atomic import atomic_directory, atomic_write_text
from peftkit.utils.command_name import command

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _base_path(run: RunAdapter) -> str | None:
    """A directory `from_pretrained` can load the base from (GGUF bases resolve to their converted cache)."""
    from peftkit.models import materialize

    if run.source.path is None:
        return None
    return materialize(run.source)


def build_manifest(run: RunAdapter, files: list[Path]) -> dict[str, Any]:
    info = run.info
    config = run.base_config
    quantization = run.quantization.model_dump() if run.quantization else None
    method = info.method if quantization is None or not info.is_lora else f"QLoRA ({info.method})"
    source = run.source
    base: dict[str, Any] = {
        "name": run.model_cfg.name,
        "kind": source.kind,
        "path": _base_path(run),
        "revision": source.revision,
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": getattr(config, "vocab_size", None),
    }
    if str(info.config.get("task_type", "")).upper() == "SEQ_CLS":  # loading needs them: peft's default head has 2
        base["labels"] = read_labels(run.run_dir)
    if source.is_gguf:
        base["converted_from_gguf"] = str(source.path)
        base["note"] = ("trained on the dequantized weights of this GGUF file, not on the original hub checkpoint; "
                        "load the base from `path` for identical results")
    serving = serving_compatibility(info, base["model_type"], tied_embeddings=getattr(config, "tie_word_embeddings", None))
    if quantization is not None and info.is_lora and serving["vllm"]["compatible"]:
        serving["vllm"]["notes"].append(vllm_quantized_base_note(quantization))
    return {
        "format": "peft",
        "peft_type": info.peft_type,
        "method": method,
        "base_model": base,
        "rank": info.rank,
        "alpha": info.alpha,
        "use_rslora": info.use_rslora,
        "use_dora": info.use_dora,
        "target_modules": info.target_modules(),
        "modules_to_save": info.modules_to_save or None,
        "task_type": info.config.get("task_type"),
        "system_prompt": run.recipe.data.system_prompt,
        "quantization": quantization,
        "bitsandbytes_config": _bnb_kwargs(run),  # how the base was loaded in training (and in verification)
        "serving": serving,
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
        "source_run": str(run.run_dir),
        "peftkit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _bnb_kwargs(run: RunAdapter) -> dict[str, Any] | None:
    """The BitsAndBytesConfig the adapter was trained under, as JSON for the verification child and the card; layers
    kept unquantized are listed with transformers' own defaults, which a skip list would otherwise replace."""
    q = run.quantization
    skip = unquantized_modules(q, default_skips(run.source, run.model_cfg, "causal_lm")) if q and q.keep_modules else None
    return bnb_kwargs(q, skip)


def _gguf_writable(config: Any) -> bool:
    """Whether `--format gguf` takes this model (advice names only the exports that work)."""
    from peftkit.export.gguf_writer import check_architecture

    try:
        check_architecture(config)
    except ExportError:
        return False
    return True


@output_lock.releases_claims
def export_adapter(run_dir: str | Path, out: str | Path | None = None, *, force: bool = False, check: bool = True,
                   base: str | None = None) -> ExportResult:
    """`peftkit export RUN_DIR --format adapter`."""
    run_dir = Path(run_dir).expanduser().resolve()
    target = prepare_output(Path(out) if out else run_dir / "adapter-export", force=force, protected=[run_dir])
    run = resolve_run(run_dir, base, require_causal_lm=check)
    if run.info.peft_type == FULL_MODEL:
        raise ExportError(f"{run.run_dir} trained the weights directly (no adapter); {run.info.path} is the model "
                          f"itself: ship it with `{command('merge', str(run.run_dir))}` (the model with its tokenizer)"
                          + (" or `--format gguf`" if _gguf_writable(run.base_config) else ""))
    # the dtype training's 4-bit layers computed in, for the reference, the verification child, manifest and card alike
    run = replace(run, quantization=trained_quantization(run.run_dir, run.quantization))
    report = None
    with disk_full_as_error(target), atomic_directory(target, replace=force) as tmp:
        assert tmp is not None
        copied = []
        for name in ADAPTER_FILES:
            shutil.copy2(run.info.path / name, tmp / name)
            copied.append(tmp / name)
        tokenizer = load_run_tokenizer(run)
        save_tokenizer(tokenizer, tmp)  # the chat template the adapter was trained with travels along
        manifest = build_manifest(run, copied)
        labels = manifest["base_model"].get("labels")
        if labels is not None:  # a classifier: its labels travel along, and the way to load it names them
            shutil.copy2(run.run_dir / "labels.json", tmp / "labels.json")
            if getattr(run.base_config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
                manifest["base_model"]["pad_token_id"] = tokenizer.pad_token_id  # as training set it
            loading = classifier_loading(labels, str(target), manifest["base_model"].get("pad_token_id"))
            manifest["serving"]["transformers+peft"]["notes"] = [f"`{loading}` (peft)"]
        if check:
            base_path = manifest["base_model"]["path"]
            if base_path is None:
                raise ExportError(
                    f"cannot verify: the base {run.model_cfg.name} is a hub id with no local copy; pass --no-verify"
                )
            quantized = run.quantization is not None
            model = _attach(_load_base(run, quantized=quantized), run.info.path)
            reference = _reference(model, tokenizer, run, f"{run.info.method} adapter as peftkit loads it")
            del model
            raw = verify.run_child("peft", tmp, reference, base=base_path, quantization=_bnb_kwargs(run),
                                   allow_pickle=run.model_cfg.allow_pickle,
                                   trust_remote_code=run.model_cfg.trust_remote_code)
            report = verify.judge(raw, "float32")
            if not report["passed"]:
                failed = save_failed_report(target, report)
                verify.enforce({**report, "failures": [*report["failures"], f"details in {failed}"]}, "adapter export")
            report = write_verification(tmp, target, report)
            manifest["verified"] = {"max_abs_diff": report["max_abs_diff"], "greedy_agreement": report["greedy_agreement"],
                                    "loader": "peft.PeftModel.from_pretrained (fresh process)"}
        write_json(tmp / "manifest.json", manifest)
        atomic_write_text(tmp / "README.md", adapter_card(manifest, report, target))
    vllm = manifest["serving"]["vllm"]
    notes = [f"vLLM multi-LoRA: {'yes' if vllm['compatible'] else 'no - ' + '; '.join(vllm['reasons'])}"
             + "".join(f"; {note}" for note in (vllm.get("notes") or []) if vllm["compatible"])]  # how to serve it
    return ExportResult(target, "adapter", list_files(target), report, None, notes)
