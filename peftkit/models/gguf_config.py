"""A GGUF model as llama.cpp runs it: what the file says, and what llama.cpp fixes per architecture.

Shared by the GGUF export (which writes these settings and refuses models llama.cpp would run differently),
its verifier (which loads the written file back with transformers) and the conversion of a `.gguf` base
model into a training directory. transformers' GGUF loader reads only part of the metadata: Qwen3's head
size (`attention.key_length`), Gemma's soft-capping, attention scale, sliding-layer pattern and second RoPE,
Llama 3.1+'s `rope_freqs` divisors and linear RoPE scaling, GPT-2's position count and MLP width, StarCoder2's
and StableLM's RoPE base (and StableLM's rotary share) are left at its defaults; `gguf_config` and
`converted_config` put them back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

@dataclass(frozen=True)
class GgufArchitecture:
    """How llama.cpp's converter writes one transformers `model_type`."""

    arch: str
    """`gguf.MODEL_ARCH` member: llama.cpp converts Mistral as LLAMA."""
    permute_qk: bool
    """Q/K rows go to llama.cpp's interleaved RoPE layout (Llama's normal RoPE, not Qwen's NEOX one)."""
    norm_shift: float = 0.0
    """Added to every RMSNorm weight: Gemma's norms scale by (1 + weight), llama.cpp's by the weight."""
    swa_period: int = 0
    """llama.cpp's fixed sliding-window layout: of every `swa_period` layers all but the last slide (0: llama.cpp
    runs no sliding window for this architecture, whatever the file says)."""
    large_layers: int = 0
    """The layer count llama.cpp takes for the largest size (Gemma 27B), whose attention scale it computes as
    1/sqrt(hidden / heads) instead of 1/sqrt(head_dim)."""
    layer_norm: bool = False
    """LayerNorm with a bias (GPT-2, StarCoder2, StableLM; eps in `attention.layer_norm_epsilon`), not RMSNorm."""
    rope: str = "full"
    """"full": RoPE over each whole head; "partial": over the `rope.dimension_count` first dims of each head, which
    llama.cpp reads from the file (StableLM); "none": learned position embeddings (GPT-2)."""
    rope_types: tuple[str, ...] = ("default", "llama3", "linear")
    """RoPE scalings written for this architecture (the newer families were checked with plain RoPE only)."""
    transposed: tuple[str, ...] = ()
    """Endings of the weights Hugging Face stores as (in, out) (GPT-2's Conv1D): the file holds them as (out, in)."""
    activations: tuple[str, ...] = ()
    """The config activations that match the one llama.cpp hard-codes for the architecture (empty: not checked)."""


TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
"""llama.cpp's GELU is the tanh approximation; the exact (erf) GELU differs by up to ~1e-3 per activation."""

GGUF_ARCHITECTURES = {
    "llama": GgufArchitecture("LLAMA", permute_qk=True),
    "mistral": GgufArchitecture("LLAMA", permute_qk=True),
    "qwen2": GgufArchitecture("QWEN2", permute_qk=False),
    "qwen3": GgufArchitecture("QWEN3", permute_qk=False),
    "phi3": GgufArchitecture("PHI3", permute_qk=False),
    "gemma2": GgufArchitecture("GEMMA2", permute_qk=False, norm_shift=1.0, swa_period=2, large_layers=46),
    "gemma3_text": GgufArchitecture("GEMMA3", permute_qk=False, norm_shift=1.0, swa_period=6, large_layers=62),
    "gpt2": GgufArchitecture("GPT2", permute_qk=False, layer_norm=True, rope="none", rope_types=("default",),
                             transposed=(".c_attn.weight", ".c_proj.weight", ".c_fc.weight"), activations=TANH_GELU),
    "starcoder2": GgufArchitecture("STARCODER2", permute_qk=False, layer_norm=True, rope_types=("default",),
                                   activations=TANH_GELU),
    "stablelm": GgufArchitecture("STABLELM", permute_qk=False, layer_norm=True, rope="partial", rope_types=("default",),
                                 activations=("silu",)),
}

LLAMA_CPP_SWA_ROPE_THETA = 10000.0
"""llama.cpp's Gemma 3 sliding-window layers use this RoPE base whatever the file says (older builds)."""


def llama_cpp_attention_dim(config: Any, layout: GgufArchitecture) -> int:
    """The d in llama.cpp's 1/sqrt(d) attention scale for Gemma (the config's `query_pre_attn_scalar`)."""
    if layout.large_layers and config.num_hidden_layers == layout.large_layers:
        return config.hidden_size // config.num_attention_heads
    return head_dim_of(config)


def llama_cpp_layer_types(config: Any, layout: GgufArchitecture) -> list[str]:
    """Which layers llama.cpp runs with the sliding window (its fixed pattern for the architecture)."""
    period = layout.swa_period
    return ["sliding_attention" if i % period < period - 1 else "full_attention" for i in range(config.num_hidden_layers)]


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_head_count(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def feed_forward_size(config: Any) -> int:
    """The MLP width: `intermediate_size`, or GPT-2's `n_inner` (None there means 4 * hidden)."""
    size = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    return int(size or 4 * config.hidden_size)


def layer_norm_eps(config: Any) -> float:
    """The LayerNorm epsilon under each family's name (GPT-2, StableLM, StarCoder2)."""
    for key in ("layer_norm_epsilon", "layer_norm_eps", "norm_epsilon"):
        if getattr(config, key, None) is not None:
            return float(getattr(config, key))
    raise ValueError(f"{config.model_type} config names no LayerNorm epsilon")


def partial_rotary_factor(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return 1.0 if factor is None else float(factor)


def rotary_dims(config: Any) -> int:
    """How many dims of each head RoPE turns (`rope.dimension_count`): all, unless `partial_rotary_factor` says."""
    return int(head_dim_of(config) * partial_rotary_factor(config))


def rope_settings(config: Any) -> dict[str, Any]:
    """The config's RoPE parameters (transformers 5 `rope_parameters`, older `rope_scaling`), `rope_type` filled in.
    For models with one RoPE per layer type (Gemma 3), those of the full-attention layers: llama.cpp's main RoPE."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return {"rope_type": "default"}
    rope = rope.get("full_attention", rope)
    return {**rope, "rope_type": rope.get("rope_type", rope.get("type", "default"))}


def sliding_rope_settings(config: Any) -> dict[str, Any] | None:
    """The sliding-window layers' own RoPE parameters, where the config gives them one (Gemma 3)."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and isinstance(rope.get("sliding_attention"), dict):
        return rope["sliding_attention"]
    local_base = getattr(config, "rope_local_base_freq", None)  # transformers 4's spelling
    return {"rope_type": "default", "rope_theta": local_base} if local_base is not None else None


def rope_freq_factors(config: Any) -> torch.Tensor | None:
    """For `llama3` RoPE: the divisor of each rotary frequency (llama.cpp's `rope_freqs` tensor), i.e. the
    unscaled inverse frequencies over the ones transformers computes for this config; None for other RoPE."""
    if rope_settings(config)["rope_type"] != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    head_dim = head_dim_of(config)
    unscaled = 1.0 / (rope_theta(config) ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return (unscaled / scaled.float()).to(torch.float32)


def rope_theta(config: Any) -> float:
    rope = rope_settings(config)
    if "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def gguf_header(path: Path) -> tuple[dict[str, Any], tuple[str, ...]]:
    """A GGUF file's metadata values and tensor names, without tensor data or the token lists. transformers'
    header reader skips the big token arrays (~0.1 s); gguf.GGUFReader parses all 100k+ array items (~10 s), so
    it is only the fallback, and then the array values (the vocabulary) are left out as well."""
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata

        return read_gguf_metadata(str(path))
    except Exception:  # noqa: BLE001 - private transformers API: fall back to the public reader
        from gguf import GGUFReader, GGUFValueType

        reader = GGUFReader(str(path))
        return ({k: f.contents() for k, f in reader.fields.items() if f.types and f.types[0] != GGUFValueType.ARRAY},
                tuple(t.name for t in reader.tensors))


def read_gguf_field(path: Path, key: str) -> Any:
    """One metadata value (not an array) of a GGUF file; a file's several values: `gguf_header` once."""
    return gguf_header(path)[0].get(key)


def read_gguf_string(path: Path, key: str) -> str | None:
    value = read_gguf_field(path, key)
    return value if isinstance(value, str) else None


def rope_freqs(path: Path, tensor_names: tuple[str, ...] | None = None) -> torch.Tensor | None:
    """llama.cpp's per-frequency RoPE divisors (Llama 3.1+), if the file has them (`tensor_names`: the header's,
    if already read)."""
    names = gguf_header(path)[1] if tensor_names is None else tensor_names
    if "rope_freqs.weight" not in names:  # the full reader parses the whole vocabulary: only when needed
        return None
    from gguf import GGUFReader

    tensor = next(t for t in GGUFReader(str(path)).tensors if t.name == "rope_freqs.weight")
    return torch.from_numpy(np.array(tensor.data, dtype=np.float32)).reshape(-1)


def gguf_config(path: Path) -> Any:
    """transformers' config of a GGUF model file, with what its loader skips set as llama.cpp reads it: the head
    size (`attention.key_length`; transformers derives Qwen3's from hidden / heads, 64 instead of 128) and, for
    Gemma, soft-capping, attention scale, sliding-layer pattern and Gemma 3's two RoPEs. RoPE scaling of other
    models is not in it (the verifier applies the file's; `converted_config` writes it into the config)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    metadata, tensor_names = gguf_header(path)
    arch = metadata["general.architecture"]
    # Llama-family projections with biases (attention_bias / mlp_bias): the config reader leaves both off, and the
    # model would be built without them (their tensors dropped), whatever the file holds.
    if hasattr(config, "attention_bias"):
        config.attention_bias = any(name.endswith("attn_q.bias") for name in tensor_names)
    if hasattr(config, "mlp_bias"):
        config.mlp_bias = any(name.endswith(("ffn_up.bias", "ffn_down.bias")) for name in tensor_names)
    key_length = metadata.get(f"{arch}.attention.key_length")
    if key_length and hasattr(config, "head_dim") and config.head_dim != int(key_length):
        config.head_dim = int(key_length)
    _set_skipped_sizes(config, metadata, tensor_names)
    layout = GGUF_ARCHITECTURES.get(config.model_type)
    if layout is None or not layout.swa_period:
        return config

    def field(key: str) -> Any:
        return metadata.get(f"{arch}.{key}")

    config.attn_logit_softcapping = field("attn_logit_softcapping")  # absent: no capping, as in llama.cpp
    config.final_logit_softcapping = field("final_logit_softcapping")
    config.query_pre_attn_scalar = llama_cpp_attention_dim(config, layout)
    config.layer_types = llama_cpp_layer_types(config, layout)
    if layout.arch == "GEMMA3":
        full: dict[str, Any] = {"rope_type": "default", "rope_theta": float(field("rope.freq_base") or 10000.0)}
        if field("rope.scaling.type") == "linear":
            full.update(rope_type="linear", factor=float(field("rope.scaling.factor")))
        local = {"rope_type": "default", "rope_theta": float(field("rope.freq_base_swa") or LLAMA_CPP_SWA_ROPE_THETA)}
        config.rope_parameters = {"full_attention": full, "sliding_attention": local}
    return config


def _set_skipped_sizes(config: Any, metadata: dict[str, Any], tensor_names: tuple[str, ...]) -> None:
    """What transformers' GGUF config reader leaves at the class defaults for GPT-2, StarCoder2 and StableLM: GPT-2's
    position table size (it sets an unused `n_ctx`, so `n_positions` stays 1024) and MLP width, StarCoder2's
    biases, and the RoPE base and rotary share of StarCoder2 / StableLM."""
    arch = metadata["general.architecture"]
    if config.model_type == "gpt2":
        config.n_positions = int(metadata[f"{arch}.context_length"])
        feed_forward = metadata.get(f"{arch}.feed_forward_length")
        config.n_inner = int(feed_forward) if feed_forward else None
        return
    if config.model_type not in ("starcoder2", "stablelm"):
        return
    if config.model_type == "starcoder2":
        config.use_bias = any(name.endswith("attn_q.bias") for name in tensor_names)
    rope = dict(getattr(config, "rope_parameters", None) or {"rope_type": "default"})
    if metadata.get(f"{arch}.rope.freq_base") is not None:
        rope["rope_theta"] = float(metadata[f"{arch}.rope.freq_base"])
    dims = metadata.get(f"{arch}.rope.dimension_count")
    if dims and config.model_type == "stablelm":
        rope["partial_rotary_factor"] = int(dims) / head_dim_of(config)
    config.rope_parameters = rope


LLAMA3_ROPE_CANDIDATES = [
    {"low_freq_factor": low, "high_freq_factor": high, "original_max_position_embeddings": 2 ** power}
    for power in (13, *range(4, 13), *range(14, 19)) for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 8.0))
]
"""Llama 3.1/3.2/3.3 (and their fine-tunes) use the first (8192, 1, 4); the rest are tried for variants."""


def llama3_rope_matching(config: Any, divisors: torch.Tensor) -> dict[str, Any] | None:
    """`llama3` RoPE parameters whose per-frequency divisors equal the file's `rope_freqs`, or None."""
    import copy

    factor = float(divisors.max())
    for candidate in LLAMA3_ROPE_CANDIDATES:
        trial = copy.deepcopy(config)
        trial.rope_parameters = {"rope_type": "llama3", "rope_theta": rope_theta(config), "factor": factor, **candidate}
        expected = rope_freq_factors(trial)
        if expected is not None and expected.shape == divisors.shape and torch.allclose(expected, divisors, rtol=1e-4):
            return trial.rope_parameters
    return None


def converted_config(path: Path) -> Any:
    """The config to train a `.gguf` base with: `gguf_config` plus the file's RoPE scaling, which transformers'
    loader drops (Llama 3.1+'s `rope_freqs` divisors become the `llama3` parameters that give exactly them)."""
    from peftkit.errors import PeftkitError

    config = gguf_config(path)
    if "full_attention" in (getattr(config, "rope_parameters", None) or {}):
        return config  # Gemma 3: set by gguf_config
    metadata, tensor_names = gguf_header(path)
    arch = metadata["general.architecture"]
    theta = rope_theta(config)
    divisors = rope_freqs(path, tensor_names)
    if divisors is not None:
        matched = llama3_rope_matching(config, divisors)
        if matched is None:
            raise PeftkitError(f"{path.name} scales RoPE with llama.cpp `rope_freqs` divisors that match no Llama 3 "
                               "RoPE setting peftkit knows; train from the original Hugging Face checkpoint instead")
        config.rope_parameters = matched
    elif metadata.get(f"{arch}.rope.scaling.type") == "linear":
        factor = float(metadata[f"{arch}.rope.scaling.factor"])
        config.rope_parameters = {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    return config
