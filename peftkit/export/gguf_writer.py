"""GGUF export for llama.cpp / Ollama: the merged model (f32, f16, q8_0) or the LoRA adapter alone.

Written with the `gguf` package the way llama.cpp's convert_hf_to_gguf.py does for Llama-family
models (Llama, Mistral, Qwen2, Qwen3): the same metadata keys, tensor names from
`gguf.get_tensor_name_map`, and for Llama/Mistral the Q/K rows permuted from Hugging Face's
rotate-half RoPE layout into llama.cpp's interleaved one (transformers' GGUF loader undoes exactly
this in `LlamaTensorProcessor`; llama.cpp runs Qwen with rotate-half RoPE, so nothing is permuted).
The tokenizer (`gguf_vocab`: byte-level BPE or sentencepiece BPE) and the chat template go into
the metadata; an Ollama `Modelfile` goes next to the file. The result is verified by loading it
back with transformers' GGUF loader.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftkit.errors import ExportError
from peftkit.export import verify
from peftkit.export.common import ExportResult, gguf_package, list_files, prepare_output, save_failed_report, write_json
from peftkit.export.gguf_vocab import add_tokenizer, check_tokenizer
from peftkit.export.merge import (
    MergedModel,
    QLoraBase,
    RunAdapter,
    load_run_tokenizer,
    load_trained_model,
    merge_run,
    resolve_run,
)
from peftkit.runs import trained_model_dir
from peftkit.utils.atomic import atomic_directory, atomic_write_text

log = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "q8_0")


@dataclass(frozen=True)
class GgufArchitecture:
    """How llama.cpp's converter writes one transformers `model_type`."""

    arch: str
    """`gguf.MODEL_ARCH` member: llama.cpp converts Mistral as LLAMA."""
    permute_qk: bool
    """Q/K rows go to llama.cpp's interleaved RoPE layout (Llama's normal RoPE, not Qwen's NEOX one)."""


GGUF_ARCHITECTURES = {
    "llama": GgufArchitecture("LLAMA", permute_qk=True),
    "mistral": GgufArchitecture("LLAMA", permute_qk=True),
    "qwen2": GgufArchitecture("QWEN2", permute_qk=False),
    "qwen3": GgufArchitecture("QWEN3", permute_qk=False),
}
CHATML_PROBE = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
]


def _types(gguf_type: str) -> tuple[Any, Any]:
    gguf = gguf_package()
    table = {
        "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
        "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
        "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    }
    if gguf_type not in table:
        raise ExportError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    return table[gguf_type]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def check_architecture(config: Any) -> GgufArchitecture:
    """The GGUF layout of `config`'s model type, or an ExportError that says what to do instead."""
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_ARCHITECTURES:
        raise ExportError(
            f"GGUF export supports {', '.join(GGUF_ARCHITECTURES)} models; this base is `{model_type}`. Export it "
            "with `--format hf` and convert that directory with llama.cpp's convert_hf_to_gguf.py"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in (None, "default"):
        raise ExportError(f"GGUF export does not handle `{rope_type}` RoPE scaling yet; export with --format hf instead")
    return GGUF_ARCHITECTURES[model_type]


def _model_arch(layout: GgufArchitecture) -> Any:
    return gguf_package().MODEL_ARCH[layout.arch]


def rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def permute_qk(weights: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp interleaved rows (convert_hf_to_gguf.py's LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def unpermute_qk(weights: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """The inverse of `permute_qk` (what transformers' GGUF loader applies)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _qk_heads(hf_name: str, config: Any, layout: GgufArchitecture) -> tuple[int, int] | None:
    """(heads, kv heads) to permute `hf_name`'s rows with, or None when its rows stay as they are."""
    if not layout.permute_qk:
        return None
    if ".q_proj." in hf_name:
        return config.num_attention_heads, config.num_attention_heads
    if ".k_proj." in hf_name:
        return config.num_attention_heads, config.num_key_value_heads
    return None


def _permute_for(hf_name: str, data: torch.Tensor, config: Any, layout: GgufArchitecture) -> torch.Tensor:
    heads = _qk_heads(hf_name, config, layout)
    return data if heads is None else permute_qk(data, *heads)


def _unpermute_for(hf_name: str, data: torch.Tensor, config: Any, layout: GgufArchitecture) -> torch.Tensor:
    heads = _qk_heads(hf_name, config, layout)
    return data if heads is None else unpermute_qk(data, *heads)


def add_model_parameters(writer: Any, config: Any) -> None:
    """`{arch}.*` hyper-parameters, as convert_hf_to_gguf.py writes them for Llama-family models."""
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        log.warning("llama.cpp ignores %s's sliding attention window (%d tokens): the GGUF model matches the "
                    "original up to that context length only", config.model_type, window)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)


# ---------------------------------------------------------------------------------------------
# Tokenizer metadata
# ---------------------------------------------------------------------------------------------


def read_gguf_field(path: Path, key: str) -> Any:
    """One metadata value of a GGUF file. transformers' header reader skips the big token arrays (~0.1 s);
    gguf.GGUFReader parses all 100k+ array items (~10 s), so it is only the fallback."""
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata

        return read_gguf_metadata(str(path))[0].get(key)
    except Exception:  # noqa: BLE001 - private transformers API: fall back to the public reader
        field = gguf_package().GGUFReader(str(path)).fields.get(key)
        return field.contents() if field is not None else None


def read_gguf_string(path: Path, key: str) -> str | None:
    value = read_gguf_field(path, key)
    return value if isinstance(value, str) else None


def source_gguf_of(run: RunAdapter) -> Path | None:
    """The GGUF file the base model was converted from, if any (built-in models are)."""
    path = run.source.path
    if path is None:
        return None
    if path.suffix == ".gguf":
        return path
    marker = path / "peftkit_source.json"
    if marker.is_file():
        origin = json.loads(marker.read_text(encoding="utf-8")).get("converted_from")
        return Path(origin) if origin else None
    return None


# ---------------------------------------------------------------------------------------------
# Model GGUF
# ---------------------------------------------------------------------------------------------


def _quantize(data: np.ndarray, qtype: Any) -> tuple[np.ndarray, Any]:
    gguf = gguf_package()
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:  # rows not a multiple of the block size: llama.cpp falls back to f16 too
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def write_model_gguf(model: Any, tokenizer: Any, path: Path, *, gguf_type: str, name: str,
                     source_gguf: Path | None = None, description: str | None = None) -> dict[str, int]:
    """Write `model` (a float32 Llama-family model) with its tokenizer to `path`. Returns tensor counts per type."""
    gguf = gguf_package()
    config = model.config
    layout = check_architecture(config)
    qtype, ftype = _types(gguf_type)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[_model_arch(layout)])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    if description:
        writer.add_description(description)
    add_model_parameters(writer, config)
    writer.add_file_type(int(ftype))
    source_pre = read_gguf_string(source_gguf, "tokenizer.ggml.pre") if source_gguf and source_gguf.is_file() else None
    add_tokenizer(writer, tokenizer, config.vocab_size, source_pre)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    name_map = gguf.get_tensor_name_map(_model_arch(layout), config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    counts: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        new_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ExportError(f"no GGUF tensor name for `{hf_name}`; this {config.model_type} variant is not supported "
                              "by the GGUF export")
        data = _permute_for(hf_name, tensor.detach().to(torch.float32).cpu(), config, layout).numpy()
        target = gguf.GGMLQuantizationType.F32 if data.ndim <= 1 or new_name.endswith("_norm.weight") else qtype
        array, written = _quantize(data, target)
        writer.add_tensor(new_name, array, raw_dtype=written)
        counts[written.name] = counts.get(written.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


# ---------------------------------------------------------------------------------------------
# Ollama Modelfile
# ---------------------------------------------------------------------------------------------

OLLAMA_CHATML_TEMPLATE = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ range .Messages }}{{ if eq .Role \"user\" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n<|im_start|>assistant\n"
    "{{ else if eq .Role \"assistant\" }}{{ .Content }}<|im_end|>\n{{ end }}{{ end }}"
)


def chatml_default_system(tokenizer: Any) -> tuple[bool, str | None]:
    """(is the chat template ChatML?, the system prompt it inserts when a conversation has none)."""
    from peftkit.models.load import CHATML_TEMPLATE

    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return False, None
    try:
        rendered = tokenizer.apply_chat_template(CHATML_PROBE, tokenize=False, add_generation_prompt=True)
        plain = tokenizer.apply_chat_template([CHATML_PROBE[1]], tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - templates that reject the probe are simply not ChatML
        return False, None
    expected = tokenizer.apply_chat_template(CHATML_PROBE, tokenize=False, add_generation_prompt=True,
                                             chat_template=CHATML_TEMPLATE)
    if rendered != expected:
        return False, None
    match = re.match(r"^<\|im_start\|>system\n(.*?)<\|im_end\|>\n<\|im_start\|>user\n", plain, re.DOTALL)
    return True, match.group(1) if match else None


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def ollama_modelfile(gguf_name: str, tokenizer: Any, system_prompt: str | None) -> str:
    is_chatml, default_system = chatml_default_system(tokenizer)
    lines = ["# Ollama Modelfile written by peftkit. Create the model with: ollama create NAME -f Modelfile",
             f"FROM ./{gguf_name}", ""]
    if is_chatml:
        lines += [f"TEMPLATE {_quote(OLLAMA_CHATML_TEMPLATE)}", ""]
        stops = ["<|im_start|>", "<|im_end|>"]
    else:
        lines += ["# The chat template is not ChatML: Ollama reads tokenizer.chat_template from the GGUF instead.", ""]
        stops = []
    eos = tokenizer.eos_token
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    system = system_prompt or default_system
    if system:
        lines += ["", f"SYSTEM {_quote(system)}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Orchestration: `peftkit export RUN_DIR --format gguf`
# ---------------------------------------------------------------------------------------------


def llama_cpp_tokenizer_check(path: Path, reference: verify.Reference) -> dict[str, Any]:
    """For a sentencepiece vocabulary: does llama.cpp's algorithm on the written file give the prompt ids the
    original tokenizer gives? (A mismatch is reported, not fatal: llama.cpp's own converter writes the same file.)"""
    from peftkit.export.llama_cpp_tokenizer import SpmVocab, tokenize

    vocab = SpmVocab.from_gguf(path)
    if vocab is None:
        return {}
    split = [(text, ids, tokenize(text, vocab)) for text, ids in zip(reference.texts, reference.prompt_ids)]
    differing = [(ids, got) for _, ids, got in split if got != ids]
    if not differing:
        return {"llama_cpp_tokenizer_match": True}
    ids, got = differing[0]
    at = next((i for i, (a, b) in enumerate(zip(ids, got)) if a != b), min(len(ids), len(got)))
    shown = [vocab.tokens[i] for i in ids[at:at + 3]], [vocab.tokens[i] for i in got[at:at + 3]]
    note = (f"llama.cpp will tokenize {len(differing)} of {len(split)} verification prompts differently from the "
            f"original tokenizer (first at token {at}: {shown[0]} here, {shown[1]} in llama.cpp). llama.cpp puts a "
            "space before the text after every special token; tokenizers whose Metaspace pre-tokenizer has "
            "prepend_scheme 'first' do not, so answers in llama.cpp/Ollama can differ slightly")
    log.warning("%s", note)
    return {"llama_cpp_tokenizer_match": False, "llama_cpp_tokenizer_note": note}


def write_gguf_export(merged: MergedModel, out: Path, *, gguf_type: str = "f16", force: bool = False,
                      check: bool = True) -> ExportResult:
    run = merged.primary
    out = prepare_output(out, force=force, protected=[r.run_dir for r in merged.runs])
    _types(gguf_type)
    check_architecture(merged.model.config)
    name = slug(run.recipe.name or run.run_dir.name)
    file_name = f"{name}-{gguf_type}.gguf"
    report = None
    with atomic_directory(out, replace=force) as tmp:
        assert tmp is not None
        counts = write_model_gguf(
            merged.model, merged.tokenizer, tmp / file_name, gguf_type=gguf_type, name=name,
            source_gguf=source_gguf_of(run),
            description=f"{run.info.method} fine-tune of {run.model_cfg.name}, merged by peftkit",
        )
        atomic_write_text(tmp / "Modelfile", ollama_modelfile(file_name, merged.tokenizer, run.recipe.data.system_prompt))
        if check:
            reference = verify.with_logits(merged.reference, merged.model, "the merged model (float32)")
            report = verify.judge(verify.run_child("gguf", tmp, reference, gguf_file=file_name), f"gguf-{gguf_type}")
            report["tensor_types"] = counts
            report.update(llama_cpp_tokenizer_check(tmp / file_name, reference))
            if not report["passed"]:
                failed = save_failed_report(out, report)
                verify.enforce({**report, "failures": [*report["failures"], f"details in {failed}"]}, "GGUF file")
            write_json(tmp / "verification.json", report)
    notes = [f"tensor types: {counts}", f"Ollama: cd {out} && ollama create {name} -f Modelfile"]
    if report is not None and not report.get("tokenizer_match", True) and "llama_cpp_tokenizer_match" not in report:
        notes.append("transformers' GGUF tokenizer splits some prompts differently than the original tokenizer")
    if report is not None and report.get("llama_cpp_tokenizer_match") is False:
        notes.append(report["llama_cpp_tokenizer_note"])
    return ExportResult(out, f"gguf-{gguf_type}", list_files(out), report, merged.qlora, notes)


def export_gguf(run_dir: str | Path, out: str | Path | None = None, *, gguf_type: str = "f16", force: bool = False,
                check: bool = True, qlora_base: QLoraBase = "dequantized", base: str | None = None) -> ExportResult:
    run_dir = Path(run_dir).expanduser().resolve()
    target = Path(out) if out else run_dir / "gguf"
    _types(gguf_type)
    prepare_output(target, force=force, protected=[run_dir])
    run = resolve_run(run_dir, base)
    check_architecture(run.base_config)
    check_tokenizer(load_run_tokenizer(run))
    if trained_model_dir(run.run_dir) is not None:  # full / partial fine-tuning: nothing to merge
        merged = load_trained_model(run_dir, base)
    else:
        merged = merge_run(run_dir, qlora_base=qlora_base, base=base)
    return write_gguf_export(merged, target, gguf_type=gguf_type, force=force, check=check)


# ---------------------------------------------------------------------------------------------
# LoRA adapter as a GGUF LoRA file (llama.cpp --lora)
# ---------------------------------------------------------------------------------------------

_LORA_TENSOR = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def gguf_lora_alpha(run: RunAdapter) -> float:
    """llama.cpp scales by alpha / rank; rsLoRA's alpha / sqrt(rank) is re-expressed in that form."""
    info = run.info
    if info.config.get("alpha_pattern"):
        raise ExportError("a GGUF LoRA holds one alpha; this adapter has per-module alphas (alpha_pattern). Merge it instead")
    alpha = float(info.alpha or 0)
    if info.use_rslora:
        if info.config.get("rank_pattern"):
            raise ExportError("rsLoRA with per-module ranks cannot be written as one GGUF alpha; merge it instead")
        alpha *= math.sqrt(float(info.rank or 1))
    return alpha


def write_lora_gguf(run: RunAdapter, path: Path, *, gguf_type: str, name: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    gguf = gguf_package()
    info = run.info
    problems = []
    if not info.is_lora:
        problems.append(f"it is {info.peft_type}, not LoRA")
    if info.use_dora:
        problems.append("DoRA magnitude vectors have no GGUF LoRA form")
    if info.modules_to_save:
        problems.append(f"modules_to_save ({', '.join(info.modules_to_save)}) cannot be carried by a GGUF LoRA")
    if problems:
        raise ExportError("this adapter cannot be written as a GGUF LoRA: " + "; ".join(problems) +
                          f". Use `peftkit export {run.run_dir} --format gguf` (merged) instead")
    config = run.base_config
    layout = check_architecture(config)
    qtype, ftype = _types(gguf_type)
    alpha = gguf_lora_alpha(run)
    tensors = load_file(str(info.path / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _LORA_TENSOR.match(key)
        if match is None:
            raise ExportError(f"unexpected adapter tensor `{key}` (embedding LoRA?); GGUF LoRA export supports linear layers")
        pairs.setdefault(match.group("module"), {})[match.group("ab")] = value.to(torch.float32)

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[_model_arch(layout)])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    add_model_parameters(writer, config)
    writer.add_file_type(int(ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    name_map = gguf.get_tensor_name_map(_model_arch(layout), config.num_hidden_layers)
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ExportError(f"the adapter has only lora_{''.join(ab)} for `{module}`; it is incomplete")
        base_name = name_map.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if base_name is None:
            raise ExportError(f"no GGUF tensor name for `{module}`")
        lora_a = ab["A"]  # (r, in): same layout llama.cpp expects
        lora_b = _permute_for(f"{module}.weight", ab["B"], config, layout)  # rows are output rows: permute like the weight
        for suffix, data in ((".lora_a", lora_a), (".lora_b", lora_b)):
            array, written = _quantize(data.numpy(), qtype)
            writer.add_tensor(base_name + suffix, array, raw_dtype=written)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"alpha": alpha, "modules": len(pairs)}


def read_lora_gguf_deltas(path: Path, base_model: Any) -> dict[str, torch.Tensor]:
    """HF parameter name -> weight delta, reconstructed from a GGUF LoRA file the way llama.cpp applies it."""
    gguf = gguf_package()
    reader = gguf.GGUFReader(str(path))
    alpha_field = reader.fields[gguf.Keys.Adapter.LORA_ALPHA]
    alpha = float(alpha_field.parts[alpha_field.data[0]][0])
    config = base_model.config
    layout = check_architecture(config)
    name_map = gguf.get_tensor_name_map(_model_arch(layout), config.num_hidden_layers)
    to_hf = {}
    for hf_name in base_model.state_dict():
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is not None:
            to_hf[gguf_name] = hf_name
    parts: dict[str, dict[str, np.ndarray]] = {}
    for tensor in reader.tensors:
        stem, _, kind = tensor.name.rpartition(".")
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        parts.setdefault(stem, {})[kind] = np.array(array, dtype=np.float32).reshape([int(n) for n in reversed(tensor.shape)])
    deltas = {}
    for stem, ab in parts.items():
        hf_name = to_hf[stem]
        lora_a, lora_b = torch.from_numpy(ab["lora_a"]), torch.from_numpy(ab["lora_b"])
        deltas[hf_name] = _unpermute_for(hf_name, (alpha / lora_b.shape[1]) * (lora_b @ lora_a), config, layout)
    return deltas


def export_gguf_adapter(run_dir: str | Path, out: str | Path | None = None, *, gguf_type: str = "f16",
                        force: bool = False, check: bool = True, base: str | None = None) -> ExportResult:
    """`peftkit export RUN_DIR --format gguf-adapter`: the LoRA alone, for `llama-cli -m BASE.gguf --lora FILE`."""
    from peftkit.export.merge import _attach, _load_base, _reference, load_run_tokenizer

    run_dir = Path(run_dir).expanduser().resolve()
    target = prepare_output(Path(out) if out else run_dir / "gguf-adapter", force=force, protected=[run_dir])
    _types(gguf_type)
    run = resolve_run(run_dir, base)
    name = slug(run.recipe.name or run.run_dir.name)
    file_name = f"{name}-lora-{gguf_type}.gguf"
    report = None
    with atomic_directory(target, replace=force) as tmp:
        assert tmp is not None
        facts = write_lora_gguf(run, tmp / file_name, gguf_type=gguf_type, name=name)
        if check:
            # Rebuild W + alpha/r * B @ A from the file (un-permuting Q/K) and compare with the adapter itself.
            tokenizer = load_run_tokenizer(run)
            reference = _reference(_attach(_load_base(run, quantized=False), run.info.path), tokenizer, run,
                                   f"{run.info.method} adapter on the float32 base (unmerged)")
            rebuilt = _load_base(run, quantized=False)
            state = rebuilt.state_dict()
            with torch.no_grad():
                for hf_name, delta in read_lora_gguf_deltas(tmp / file_name, rebuilt).items():
                    state[hf_name].add_(delta.to(state[hf_name].dtype))
            logits = verify.sequence_logits(rebuilt, reference.sequences())
            report = verify.judge({**verify.compare(reference, logits), "reference": reference.label,
                                   "kind": "gguf-adapter (reconstructed in process)"}, f"gguf-{gguf_type}")
            if not report["passed"]:
                verify.enforce(report, "GGUF LoRA file")
            write_json(tmp / "verification.json", report)
        source = source_gguf_of(run)
        modelfile = ["# Ollama: base model + this LoRA. Create with: ollama create NAME -f Modelfile",
                     f"FROM {source}" if source else "FROM /path/to/base-model.gguf  # the base this LoRA was trained on",
                     f"ADAPTER ./{file_name}"]
        atomic_write_text(tmp / "Modelfile", "\n".join(modelfile) + "\n")
    notes = [f"alpha written: {facts['alpha']:.4g} over {facts['modules']} modules",
             f"llama.cpp: llama-cli -m {source or 'BASE.gguf'} --lora {target / file_name}"]
    if source is not None:
        notes.append(f"the Modelfile's FROM is the GGUF the base was converted from ({source.name}): the weights "
                     "this adapter was trained on" + (", before the extra 4-bit quantization of QLoRA"
                                                      if run.quantization is not None else ""))
    return ExportResult(target, f"gguf-adapter-{gguf_type}", list_files(target), report, None, notes)
