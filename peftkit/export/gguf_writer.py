"""GGUF export of the merged model for llama.cpp / Ollama (f32, f16, q8_0); the LoRA alone: `gguf_lora`.

Written with the `gguf` package the way llama.cpp's convert_hf_to_gguf.py does for decoder models
(Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3, GPT-2, StarCoder2, StableLM): the same metadata keys,
tensor names from `gguf.get_tensor_name_map`, and for Llama/Mistral the Q/K rows permuted from Hugging Face's
rotate-half RoPE layout into llama.cpp's interleaved one (transformers' GGUF loader undoes exactly
this in `LlamaTensorProcessor`; llama.cpp runs Qwen, Phi-3, Gemma, StarCoder2 and StableLM with rotate-half
RoPE, so nothing is permuted). GPT-2's Conv1D weights, stored (in, out), are written transposed. Gemma's
RMSNorm scales by (1 + weight) where llama.cpp scales by the weight: its norm weights are written plus one.
What llama.cpp does not read from the file but fixes per architecture (Gemma's sliding-window layer pattern
and attention scale, GPT-2 / StarCoder2 / StableLM's activation) is checked against the model's config first
(`llama_cpp_mismatches`), so a file that would run differently in llama.cpp is never written.
The tokenizer (`gguf_vocab`: byte-level BPE or sentencepiece BPE) and the chat template go into
the metadata; an Ollama `Modelfile` (`ollama`) goes next to the file. The result is verified by loading it
back with transformers' GGUF loader.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftkit.errors import ExportError
from peftkit.export import llama_cpp_check, verify
from peftkit.export.compat import OUTPUT_HEAD_MODULES, TOKEN_EMBEDDING_MODULES
from peftkit.export import output_lock
from peftkit.export.common import (ExportResult, check_room, disk_full_as_error, gguf_package, list_files, prepare_output, save_failed_report,
                                   write_verification)
from peftkit.export.gguf_types import GGUF_TYPES
from peftkit.export.gguf_vocab import add_tokenizer, check_tokenizer
from peftkit.export.ollama import has_ollama_template, ollama_modelfile
from peftkit.models.gguf_config import (  # noqa: F401 - re-exported: the export's view of the same facts
    GGUF_ARCHITECTURES,
    LLAMA_CPP_SWA_ROPE_THETA,
    GgufArchitecture,
    feed_forward_size,
    head_dim_of,
    kv_head_count,
    layer_norm_eps,
    llama_cpp_attention_dim,
    llama_cpp_layer_types,
    partial_rotary_factor,
    read_gguf_field,
    read_gguf_string,
    rope_freq_factors,
    rope_settings,
    rope_theta,
    rotary_dims,
    sliding_rope_settings,
)
from peftkit.export.merge import (
    MergedModel,
    QLoraBase,
    RunAdapter,
    load_run_tokenizer,
    merge_failed,
    resolve_run,
    shipped_model,
)
from peftkit.utils.atomic import atomic_directory, atomic_write_text

log = logging.getLogger(__name__)

def gguf_types(gguf_type: str, allowed: tuple[str, ...] = GGUF_TYPES, what: str = "") -> tuple[Any, Any]:
    """The tensor type and the file type (`general.file_type`) of a `--gguf-type` choice; `what`: the export it is
    for, where it takes fewer types than the model GGUF does."""
    gguf = gguf_package()
    if gguf_type not in allowed:
        raise ExportError(f"--gguf-type must be one of {', '.join(allowed)}{f' for {what}' if what else ''}, "
                          f"got {gguf_type!r}")
    if gguf_type == "f32":
        return gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32
    if gguf_type == "f16":
        return gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16
    return gguf.GGMLQuantizationType[gguf_type.upper()], gguf.LlamaFileType[f"MOSTLY_{gguf_type.upper()}"]


def tensor_type(gguf_name: str, data: np.ndarray, qtype: Any, has_output: bool) -> Any:
    """The type one tensor is written in. Vectors and norms stay float32 (as llama.cpp's converter writes them). In a
    4- or 5-bit file the output head (or, tied, the embedding table that serves as one) is written as Q8_0: llama.cpp's
    `llama-quantize` keeps it finer too (Q6_K there), since its rounding error lands directly on every logit."""
    gguf = gguf_package()
    if data.ndim <= 1 or gguf_name.endswith("_norm.weight") or gguf_name == "position_embd.weight":
        return gguf.GGMLQuantizationType.F32  # learned positions (GPT-2) stay float32 too, as the converter keeps them
    coarse = qtype.name.startswith(("Q4", "Q5"))
    head = gguf_name == "output.weight" or (not has_output and gguf_name == "token_embd.weight")
    return gguf.GGMLQuantizationType.Q8_0 if coarse and head else qtype


def slug(text: str) -> str:
    """A file and Ollama model name: accents dropped from letters (`ünï` -> `uni`), anything else not in
    [A-Za-z0-9._-] turned into `-`."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", ascii_text).strip("-") or "model"


def check_architecture(config: Any, *, with_rope: bool = True) -> GgufArchitecture:
    """The GGUF layout of `config`'s model type, or an ExportError that says what to do instead. `with_rope=False`
    for LoRA adapters: they carry no RoPE settings (llama.cpp takes those from the base GGUF), so a base with RoPE
    scaling (Llama 3.1+ `llama3`) is fine for them."""
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_ARCHITECTURES:
        raise ExportError(
            f"GGUF export supports {', '.join(GGUF_ARCHITECTURES)} models; this base is `{model_type}`. Export it "
            "with `--format hf` and convert that directory with llama.cpp's convert_hf_to_gguf.py"
        )
    layout = GGUF_ARCHITECTURES[model_type]
    rope_type = rope_settings(config).get("rope_type") or "default"
    written = [t for t in GGUF_ROPE_TYPES if t in layout.rope_types]
    if with_rope and rope_type not in written:
        raise ExportError(f"GGUF export writes {', '.join(written)} RoPE, not `{rope_type}` scaling, for {model_type} "
                          "models; export with --format hf and convert that directory with llama.cpp's "
                          "convert_hf_to_gguf.py")
    problems = llama_cpp_mismatches(config, layout, writes_rope=with_rope)
    if problems:
        raise ExportError(f"llama.cpp would not run this {model_type} model as it was trained: " + "; ".join(problems) +
                          ". Serve it with transformers (`--format hf`) or vLLM (`--format adapter`) instead")
    return layout


def llama_cpp_mismatches(config: Any, layout: GgufArchitecture, *, writes_rope: bool = True) -> list[str]:
    """Settings of `config` that llama.cpp hard-codes for the architecture and would run differently, and (where
    `writes_rope`: a model GGUF, not a LoRA on llama.cpp's own conversion of the base) RoPE the export cannot write."""
    problems = []
    partial = partial_rotary_factor(config)
    if partial != 1.0 and layout.rope != "partial":
        if writes_rope or layout.arch != "PHI3":  # llama.cpp's converter writes phi3's share (Phi-4-mini: 0.75)
            problems.append(f"RoPE on {partial:g} of each head (partial_rotary_factor) is not written by peftkit's GGUF "
                            "export")
    elif layout.rope == "partial" and (rotary_dims(config) % 2 or rotary_dims(config) != partial * head_dim_of(config)):
        problems.append(f"RoPE on {partial:g} of each {head_dim_of(config)}-dim head is not a whole, even number of dims")
    problems += _fixed_graph_mismatches(config, layout)
    if layout.arch in LLAMA_CPP_EMBEDDINGS_AS_HEAD and not getattr(config, "tie_word_embeddings", True):
        problems.append(f"{embeddings_as_head(layout)}, and this model has a head of its own (tie_word_embeddings: "
                        "false)")
    if not layout.swa_period:
        return problems
    expected_dim = llama_cpp_attention_dim(config, layout)
    scalar = getattr(config, "query_pre_attn_scalar", expected_dim)
    if scalar != expected_dim:
        problems.append(f"llama.cpp scales attention by 1/sqrt({expected_dim}) for this size, the model by "
                        f"1/sqrt({scalar}) (query_pre_attn_scalar)")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and list(layer_types) != llama_cpp_layer_types(config, layout):
        problems.append(f"llama.cpp slides the attention window on all but every {layout.swa_period}th layer; this "
                        "model's layer_types differ")
    local = sliding_rope_settings(config)
    if local is not None and (local.get("rope_type", "default") != "default"
                              or float(local.get("rope_theta", LLAMA_CPP_SWA_ROPE_THETA)) != LLAMA_CPP_SWA_ROPE_THETA):
        problems.append(f"llama.cpp runs the sliding-window layers with plain RoPE of base {LLAMA_CPP_SWA_ROPE_THETA:g}; "
                        f"this model uses {local}")
    if layout.arch == "GEMMA3" and getattr(config, "attn_logit_softcapping", None) is not None:
        problems.append("llama.cpp's Gemma 3 has no attention logit soft-capping")
    return problems


def _fixed_graph_mismatches(config: Any, layout: GgufArchitecture) -> list[str]:
    """Parts of GPT-2 / StarCoder2 / StableLM blocks that llama.cpp's graph for them fixes, unlike the config."""
    problems = []
    activation = getattr(config, "activation_function", None) or getattr(config, "hidden_act", None)
    if layout.activations and activation not in layout.activations:
        problems.append(f"llama.cpp's {config.model_type} computes {' / '.join(layout.activations)} in the MLP, the model "
                        f"{activation!r}")
    if layout.arch == "GPT2" and (not getattr(config, "scale_attn_weights", True)
                                  or getattr(config, "scale_attn_by_inverse_layer_idx", False)):
        problems.append("llama.cpp's GPT-2 scales attention by 1/sqrt(head_dim) only (scale_attn_weights on, "
                        "scale_attn_by_inverse_layer_idx off)")
    if layout.arch == "STABLELM" and getattr(config, "qk_layernorm", False):
        problems.append("StableLM's per-head q/k LayerNorms (qk_layernorm) are not written by peftkit's GGUF export")
    return problems


LLAMA_CPP_EMBEDDINGS_AS_HEAD = frozenset({"GEMMA2"})
"""Architectures whose llama.cpp graph always runs the output head with the token embeddings: its Gemma 2 loader
reads no `output.weight` (convert_hf_to_gguf.py drops `lm_head`, gguf-py has no OUTPUT tensor for GEMMA2), so an
untied head would be lost. Gemma 3 reads `output.weight` where the file has one (checked with llama-cpp-python
0.3.36)."""


def embeddings_as_head(layout: GgufArchitecture) -> str:
    """Why llama.cpp loses an untied output head of an architecture in LLAMA_CPP_EMBEDDINGS_AS_HEAD."""
    arch = layout.arch.lower()
    return f"llama.cpp's {arch} runs the output head with the token embeddings (a {arch} GGUF has no output.weight)"


def merge_unties_head(run: RunAdapter) -> str | None:
    """Why merging `run` gives its tied base's output head a matrix of its own (`merge.merged_model`, peft's
    modules_to_save), or None; known from the adapter's files, before anything is merged."""
    if not getattr(run.base_config, "tie_word_embeddings", True):
        return None
    info = run.info
    if info.embedding_modules:
        return (f"the adapter has a LoRA on the input embeddings ({', '.join(info.embedding_modules)}), which the merge "
                "keeps out of the output head that shares them")
    whole = [name for name in info.modules_to_save
             if name.split(".")[-1] in (*OUTPUT_HEAD_MODULES, *TOKEN_EMBEDDING_MODULES)]
    if whole:
        return f"the adapter trained {', '.join(whole)} in full (modules_to_save), so head and embeddings differ"
    return None


def check_merged_head(run: RunAdapter, layout: GgufArchitecture) -> None:
    """Refuse, before merging, a merged model whose own output head llama.cpp would not read."""
    why = merge_unties_head(run) if layout.arch in LLAMA_CPP_EMBEDDINGS_AS_HEAD else None
    if why is not None:
        raise ExportError(f"merging this run unties its {run.base_config.model_type} base's output head: {why}; but "
                          f"{embeddings_as_head(layout)}, so there the merged model would answer otherwise than it was "
                          "trained. Train without a LoRA on embed_tokens / lm_head (and without them in "
                          "modules_to_save), or serve it with transformers (`--format hf`) or vLLM (`--format adapter`)")


GGUF_ROPE_TYPES = ("default", "llama3", "linear")
"""RoPE variants the model GGUF export writes: Llama 3.1+'s `llama3` as llama.cpp's per-frequency `rope_freqs`
tensor, `linear` as the `rope.scaling.*` keys."""


def model_arch(layout: GgufArchitecture) -> Any:
    return gguf_package().MODEL_ARCH[layout.arch]


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


def permute_for(hf_name: str, data: torch.Tensor, config: Any, layout: GgufArchitecture) -> torch.Tensor:
    heads = _qk_heads(hf_name, config, layout)
    return data if heads is None else permute_qk(data, *heads)


def stored_transposed(hf_name: str, layout: GgufArchitecture) -> bool:
    """Whether `hf_name` is a weight Hugging Face keeps as (in, out) (GPT-2's Conv1D) and the file as (out, in)."""
    return hf_name.endswith(layout.transposed)  # False for an empty tuple


def file_layout(hf_name: str, data: torch.Tensor, config: Any, layout: GgufArchitecture) -> torch.Tensor:
    """A Hugging Face weight as the file holds it: Conv1D weights transposed, Llama's Q/K rows permuted."""
    if stored_transposed(hf_name, layout):
        data = data.T.contiguous()
    return permute_for(hf_name, data, config, layout)


def unpermute_for(hf_name: str, data: torch.Tensor, config: Any, layout: GgufArchitecture) -> torch.Tensor:
    heads = _qk_heads(hf_name, config, layout)
    return data if heads is None else unpermute_qk(data, *heads)


def ignored_sliding_window(config: Any, layout: GgufArchitecture) -> int | None:
    """The model's sliding attention window where llama.cpp runs full attention instead (Mistral v0.1, Phi-3)."""
    window = getattr(config, "sliding_window", None)
    if (window and not layout.swa_period and getattr(config, "use_sliding_window", True)
            and window < config.max_position_embeddings):
        return int(window)
    return None


def add_model_parameters(writer: Any, config: Any, layout: GgufArchitecture) -> None:
    """`{arch}.*` hyper-parameters, as convert_hf_to_gguf.py writes them for the architecture."""
    ignored = ignored_sliding_window(config, layout)
    if ignored:
        log.warning("llama.cpp ignores %s's sliding attention window (%d tokens): the GGUF model matches the "
                    "original up to that context length only", config.model_type, ignored)
    window = getattr(config, "sliding_window", None)
    head_dim = head_dim_of(config)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(feed_forward_size(config))
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(kv_head_count(config))
    if layout.layer_norm:
        writer.add_layer_norm_eps(layer_norm_eps(config))
    else:
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if layout.rope == "none":  # GPT-2: learned position embeddings (`position_embd`)
        return
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_rope_dimension_count(rotary_dims(config))
    rope = rope_settings(config)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf_package().RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    original_context = getattr(config, "original_max_position_embeddings", None)
    if layout.arch == "PHI3" and original_context:
        writer.add_rope_scaling_orig_ctx_len(int(original_context))
    if layout.swa_period and window:
        writer.add_sliding_window(int(window))
        local = sliding_rope_settings(config)
        if local is not None:  # newer llama.cpp reads it; older ones assume this same value
            writer.add_rope_freq_base_swa(float(local.get("rope_theta", LLAMA_CPP_SWA_ROPE_THETA)))
        for key, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                         ("final_logit_softcapping", writer.add_final_logit_softcapping)):
            if getattr(config, key, None) is not None:
                add(float(getattr(config, key)))


# ---------------------------------------------------------------------------------------------
# Reading GGUF metadata
# ---------------------------------------------------------------------------------------------


def trained_plain_text(run_dir: Path) -> bool:
    """Whether the run trained plain-text rows (its summary's data formats), which carry the tokenizer's own BOS."""
    try:
        stats = json.loads((run_dir / "summary.json").read_text(encoding="utf-8")).get("data_stats") or {}
        return bool((stats.get("train_formats") or {}).get("text"))
    except (OSError, ValueError, AttributeError):
        return False


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


def quantize_array(data: np.ndarray, qtype: Any) -> tuple[np.ndarray, Any]:
    gguf = gguf_package()
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:  # rows not a multiple of the block size: llama.cpp falls back to f16 too
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


GGUF_NAMES_READ_AS_ARCHITECTURES = frozenset({"mistral"})
"""`general.name` values transformers' GGUF loader takes for an architecture (a llama file named exactly
`mistral` is loaded as a `mistral` GGUF, which it cannot read): such a name gets a suffix."""

LLAMA_CPP_PHI3_NAME = re.compile(r"phi-?3", re.IGNORECASE)
LLAMA_CPP_PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")
"""llama.cpp reads no per-token attributes from a GGUF. It gives special tokens Phi-3's right-stripping (the
whitespace after `<|user|>`, `<|end|>`, ... belongs to the token, as in Phi-3's tokenizer.json) by *name*: when
the lower-cased `general.name` contains `phi3` or `phi-3`, looking these four tokens up by text (a vocabulary
without one of them fails to load: `unordered_map::at`)."""


def gguf_general_name(name: str, tokenizer: Any) -> str:
    """`general.name` for a model file: `name`, unless llama.cpp or transformers would read it as something else.

    The Phi-3 marker is there exactly when llama.cpp can and should apply Phi-3's right-stripping: a Phi-3
    vocabulary exported as `support-desk` would otherwise tokenize `<|user|>\n` as two tokens in llama.cpp
    (one in training), and a run named `phi3-desk` on another vocabulary would not load.
    """
    if name in GGUF_NAMES_READ_AS_ARCHITECTURES:
        return f"{name}-finetune"
    vocab = tokenizer.get_vocab()
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    phi3_stripping = (all(token in vocab for token in LLAMA_CPP_PHI3_TOKENS)
                      and any(getattr(t, "special", False) and getattr(t, "rstrip", False) for t in added))
    if phi3_stripping and not LLAMA_CPP_PHI3_NAME.search(name):
        return f"{name}-phi3"
    if not phi3_stripping and LLAMA_CPP_PHI3_NAME.search(name):
        return LLAMA_CPP_PHI3_NAME.sub(lambda found: found.group(0)[:3] + "_3", name)  # keeps the name's case
    return name


def write_model_gguf(model: Any, tokenizer: Any, path: Path, *, gguf_type: str, name: str,
                     source_gguf: Path | None = None, description: str | None = None,
                     plain_text: bool = False) -> dict[str, int]:
    """Write `model` (a float32 Llama-family model) with its tokenizer to `path`. Returns tensor counts per type.
    `plain_text`: it was trained on plain-text rows (gguf_vocab.gguf_adds_bos)."""
    gguf = gguf_package()
    config = model.config
    layout = check_architecture(config)
    qtype, ftype = gguf_types(gguf_type)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[model_arch(layout)])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(gguf_general_name(name, tokenizer))
    if description:
        writer.add_description(description)
    add_model_parameters(writer, config, layout)
    writer.add_file_type(int(ftype))
    source_pre = read_gguf_string(source_gguf, "tokenizer.ggml.pre") if source_gguf and source_gguf.is_file() else None
    add_tokenizer(writer, tokenizer, config.vocab_size, source_pre, plain_text=plain_text)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    name_map = gguf.get_tensor_name_map(model_arch(layout), config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    counts: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        new_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ExportError(f"no GGUF tensor name for `{hf_name}`; this {config.model_type} variant is not supported "
                              "by the GGUF export")
        data = file_layout(hf_name, tensor.detach().to(torch.float32).cpu(), config, layout)
        if layout.norm_shift and hf_name.endswith("norm.weight"):
            data = data + layout.norm_shift
        data = data.numpy()
        array, written = quantize_array(data, tensor_type(new_name, data, qtype, has_output=not tied))
        writer.add_tensor(new_name, array, raw_dtype=written)
        counts[written.name] = counts.get(written.name, 0) + 1
    factors = rope_freq_factors(config)
    if factors is not None:  # as convert_hf_to_gguf.py writes Llama 3.1+: llama.cpp divides each frequency by it
        writer.add_tensor(f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight", factors.numpy())
        counts["F32"] = counts.get("F32", 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def round_like_file(model: Any, gguf_type: str) -> None:
    """Round `model`'s weights in place as a `gguf_type` file stores them (each quantized tensor through gguf-py's
    quantize / dequantize round trip, the same per-tensor types as `write_model_gguf`).

    A quantized file cannot match the float model closely (4-bit SmolLM2-135M: logits off by a third of the largest);
    against the rounded model it must match at float32's bound, so a file written wrongly is still caught. Blocks lie
    along rows, so rounding before the Q/K row permutation is the same as after it; a transposed (Conv1D) weight is
    rounded along the file's rows."""
    gguf = gguf_package()
    qtype, _ = gguf_types(gguf_type)
    layout = check_architecture(model.config)
    name_map = gguf.get_tensor_name_map(model_arch(layout), model.config.num_hidden_layers)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    with torch.no_grad():
        for hf_name, tensor in model.state_dict().items():
            if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                continue
            transposed = stored_transposed(hf_name, layout)
            data = tensor.detach().to(torch.float32).cpu().numpy()
            data = np.ascontiguousarray(data.T) if transposed else data
            target = tensor_type(name_map.get_name(hf_name, try_suffixes=(".weight", ".bias")) or hf_name, data, qtype,
                                 has_output=not tied)
            if target == gguf.GGMLQuantizationType.F32:
                continue
            array, written = quantize_array(data, target)
            rounded = gguf.quants.dequantize(array, written).reshape(data.shape)
            rounded = rounded.T if transposed else rounded
            tensor.copy_(torch.from_numpy(np.ascontiguousarray(rounded)).to(tensor.dtype))


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


LOW_ROUNDING_AGREEMENT = 0.9
"""Below this greedy-token agreement between a quantized file and the float model, the export warns."""


def rounding_report(reference: verify.Reference, rounded: verify.Reference, gguf_type: str) -> dict[str, Any]:
    """What the file's rounding costs, measured (not judged): the rounded model against the float merged model."""
    measured = verify.compare(reference, rounded.logits)
    report = {key: measured[key] for key in ("max_abs_diff", "max_abs_reference_logit", "greedy_agreement",
                                             "greedy_exact")}
    note = (f"{gguf_type} rounding: greedy-token agreement with the float model {measured['greedy_agreement']:.1%}, "
            f"identical answers to {measured['greedy_exact']:.0%} of {measured['prompts']} prompts, max |logit diff| "
            f"{measured['max_abs_diff']:.3g} of {measured['max_abs_reference_logit']:.3g}")
    if measured["greedy_agreement"] < LOW_ROUNDING_AGREEMENT:
        note += (". That is a large change for this model (small models lose most to 4- and 5-bit rounding): compare "
                 "its answers with `--gguf-type q8_0` or f16 before shipping it")
        log.warning("%s", note)
    return {**report, "note": note}


def check_merge(merged: MergedModel, merged_reference: verify.Reference) -> dict[str, Any]:
    """The merged model (`merged_reference`: its logits) against what was trained (the adapter, unmerged), before a
    GGUF of it is written: the GGUF itself is then compared with the merged model, which isolates the file's own
    rounding."""
    report = verify.judge(verify.compare(merged.reference, merged_reference.logits), "float32")
    if not report["passed"]:
        raise ExportError(merge_failed(merged, report["failures"], "a GGUF of it"))
    return {key: report[key] for key in ("max_abs_diff", "tolerance", "greedy_agreement", "passed")}


@output_lock.releases_claims
def write_gguf_export(merged: MergedModel, out: Path, *, gguf_type: str = "f16", force: bool = False,
                      check: bool = True) -> ExportResult:
    """Write and verify the GGUF of a merged model. Verifying a block-quantized type (q8_0 ... q4_0) rounds
    `merged.model`'s weights in place (`round_like_file`): do not use it for another export afterwards."""
    run = merged.primary
    out = prepare_output(out, force=force, protected=[r.run_dir for r in merged.runs])
    gguf_types(gguf_type)
    layout = check_architecture(merged.model.config)
    check_room(out, merged.model, gguf_type, "GGUF file")
    reference = verify.with_logits(merged.reference, merged.model, "the merged model (float32)") if check else None
    # QLoRA merges are measured in merged.qlora, against the adapter on its quantized base
    merge_report = check_merge(merged, reference) if reference is not None and merged.qlora is None else None
    name = slug(run.recipe.name or run.run_dir.name)
    file_name = f"{name}-{gguf_type}.gguf"
    report = None
    with disk_full_as_error(out), atomic_directory(out, replace=force) as tmp:
        assert tmp is not None
        counts = write_model_gguf(
            merged.model, merged.tokenizer, tmp / file_name, gguf_type=gguf_type, name=name,
            source_gguf=source_gguf_of(run),
            description=f"{run.info.method} fine-tune of {run.model_cfg.name}, merged by peftkit",
            plain_text=any(trained_plain_text(r.run_dir) for r in merged.runs),
        )
        atomic_write_text(tmp / "Modelfile", ollama_modelfile(file_name, merged.tokenizer, run.recipe.data.system_prompt))
        if reference is not None:
            file_reference, precision = reference, f"gguf-{gguf_type}"
            if gguf_type not in ("f32", "f16"):  # the merged model is not used again: round it as the file stores it
                round_like_file(merged.model, gguf_type)
                file_reference = verify.with_logits(reference, merged.model, f"the merged model with its weights "
                                                    f"rounded to {gguf_type} as the file stores them")
                precision = "gguf-f32"
            report = verify.judge(verify.run_child("gguf", tmp, file_reference, gguf_file=file_name), precision)
            if file_reference is not reference:
                report["rounding"] = rounding_report(reference, file_reference, gguf_type)
            report["tensor_types"] = counts
            report["merge"] = merge_report
            report.update(llama_cpp_tokenizer_check(tmp / file_name, reference))
            try:
                cpp_precision = f"llama.cpp-{gguf_type}" if file_reference is reference else "llama.cpp-quantized"
                report["llama_cpp"] = (llama_cpp_check.check(tmp / file_name, file_reference, precision=cpp_precision)
                                       if report["passed"] else llama_cpp_check.not_run("the transformers check failed"))
            except ExportError as error:  # llama.cpp could not load it: keep what the transformers check measured
                save_failed_report(out, {**report, "passed": False, "failures": [str(error)]})
                raise
            if report["llama_cpp"].get("passed") is False:
                report["passed"] = False
                report["failures"] = [*report["failures"], *(f"in llama.cpp: {f}" for f in report["llama_cpp"]["failures"])]
            window = ignored_sliding_window(merged.model.config, layout)
            crossed = (f"the verification prompts are longer than the model's {window}-token sliding window, which "
                       "llama.cpp ignores: in llama.cpp this model answers differently beyond it (export with --format "
                       "hf for an exact copy)") if window and max(map(len, reference.sequences())) > window else None
            if not report["passed"]:
                failed = save_failed_report(out, report)
                hints = [f"details in {failed}", *([crossed] if crossed else [])]
                verify.enforce({**report, "failures": [*report["failures"], *hints]}, "GGUF file")
            if crossed:  # passed within tolerance, yet past the window the comparison measures that difference too
                report["sliding_window_crossed"] = crossed
            report = write_verification(tmp, out, report)
    notes = [f"tensor types: {counts}", f"Ollama: cd {shlex.quote(str(out))} && ollama create {name} -f Modelfile"]
    if report is not None:
        notes.append(llama_cpp_check.summary(report["llama_cpp"]))
    if report is not None and "rounding" in report:
        notes.append(report["rounding"]["note"])
    if report is not None and report.get("sliding_window_crossed"):
        notes.append(f"WARNING: {report['sliding_window_crossed']}; the check passed within its tolerance anyway")
    if not has_ollama_template(merged.tokenizer):
        notes.append("Ollama: the Modelfile has no TEMPLATE (this chat template's turns are not fixed texts peftkit can "
                     "rewrite); Ollama does not run the GGUF's Jinja template, so check `ollama show NAME --template`")
    if report is not None and not report.get("tokenizer_match", True) and "llama_cpp_tokenizer_match" not in report:
        notes.append("transformers' GGUF tokenizer splits some prompts differently than the original tokenizer")
    if report is not None and report.get("llama_cpp_tokenizer_match") is False:
        notes.append(report["llama_cpp_tokenizer_note"])
    return ExportResult(out, f"gguf-{gguf_type}", list_files(out), report, merged.qlora, notes)


@output_lock.releases_claims
def export_gguf(run_dir: str | Path, out: str | Path | None = None, *, gguf_type: str = "f16", force: bool = False,
                check: bool = True, qlora_base: QLoraBase = "dequantized", base: str | None = None) -> ExportResult:
    run_dir = Path(run_dir).expanduser().resolve()
    target = Path(out) if out else run_dir / "gguf"
    gguf_types(gguf_type)
    held = sorted(p.name for p in target.glob("*.gguf")) if out is None and not force else []
    if held and not any(name.endswith(f"-{gguf_type}.gguf") for name in held):  # another type: keep both, by name
        raise ExportError(f"{target} holds an earlier GGUF export ({', '.join(held)}); to keep it beside this "
                          f"{gguf_type} one pass `--out {run_dir / f'gguf-{gguf_type}'}`, or --force to replace it")
    prepare_output(target, force=force, protected=[run_dir])
    run = resolve_run(run_dir, base)
    check_merged_head(run, check_architecture(run.base_config))
    check_tokenizer(load_run_tokenizer(run))
    merged = shipped_model(run_dir, qlora_base=qlora_base, base=base)
    return write_gguf_export(merged, target, gguf_type=gguf_type, force=force, check=check)
