"""What an adapter directory is, whether it fits a base model, and which serving engines accept it.

Everything here reads files only (adapter_config.json, the safetensors header, the base's
config.json through a meta-device skeleton), so a mismatch is reported before any weights load.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from peftkit.errors import ExportError
from peftkit.models.fingerprint import BASE_CONFIG_KEYS
from peftkit.utils.command_name import command

PROMPT_LEARNING_TYPES = frozenset({"PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT"})
"""peft types that add virtual tokens instead of changing weights: nothing to fold into a checkpoint."""

WEIGHT_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterInfo:
    """The facts about an adapter that merge/export decisions depend on."""

    path: Path
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "UNKNOWN")).upper()

    @property
    def is_prompt_learning(self) -> bool:
        return self.peft_type in PROMPT_LEARNING_TYPES

    @property
    def is_lora(self) -> bool:
        return self.peft_type == "LORA"

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))

    @property
    def rank(self) -> int | None:
        return self.config.get("r")

    @property
    def alpha(self) -> float | None:
        return self.config.get("lora_alpha")

    @property
    def modules_to_save(self) -> list[str]:
        return list(self.config.get("modules_to_save") or [])

    @property
    def method(self) -> str:
        """Human name: LoRA, DoRA, rsLoRA, IA3, PREFIX_TUNING, ..."""
        if self.is_lora:
            return "DoRA" if self.use_dora else "rsLoRA" if self.use_rslora else "LoRA"
        if self.peft_type == "FULL_MODEL":
            return f"{self.config.get('method', 'full')} fine-tuning"
        return {"IA3": "IA3"}.get(self.peft_type, self.peft_type)

    @property
    def embedding_modules(self) -> list[str]:
        """Embedding layers the adapter has a LoRA on (peft's `lora_embedding_A/B` tensors)."""
        return sorted({key.split(".lora_embedding_")[0].removeprefix(_PREFIX) for key in self.shapes
                       if ".lora_embedding_" in key})

    @property
    def output_head_modules(self) -> list[str]:
        """Output heads (`lm_head`) the adapter has a linear LoRA on."""
        return sorted({key.split(".lora_A.")[0].removeprefix(_PREFIX) for key in self.shapes
                       if ".lora_A." in key and key.split(".lora_A.")[0].split(".")[-1] in OUTPUT_HEAD_MODULES})

    def target_modules(self) -> list[str] | str | None:
        targets = self.config.get("target_modules")
        return sorted(targets) if isinstance(targets, (list, set, tuple)) else targets


def read_adapter(path: Path) -> AdapterInfo:
    """adapter_config.json plus tensor shapes from the safetensors header (no tensor data is read)."""
    config_path = path / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path} has no adapter_config.json; it is not a PEFT adapter directory") from None
    except json.JSONDecodeError as exc:
        raise ExportError(f"{config_path} is not valid JSON ({exc}); the adapter is damaged, re-save it") from None
    shapes: dict[str, tuple[int, ...]] = {}
    weights = path / WEIGHT_FILE
    if weights.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt") as handle:
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except Exception as exc:  # SafetensorError: truncated, empty or not a safetensors file
            raise ExportError(f"{weights} is damaged ({exc}); the adapter cannot be read. Restore it (a run keeps "
                              "its last checkpoints in checkpoints/), or train again") from None
    elif any(path.glob("adapter_model.bin")):
        raise ExportError(
            f"{path} holds the adapter as adapter_model.bin (pickle); peftkit reads safetensors only. "
            "Re-save it with `model.save_pretrained(dir, safe_serialization=True)`"
        )
    else:
        raise ExportError(f"{path} has adapter_config.json but no {WEIGHT_FILE}; the adapter was not saved completely")
    info = AdapterInfo(path, config, shapes)
    _check_ranks(info)
    return info


def _check_ranks(info: AdapterInfo) -> None:
    """adapter_config.json must describe these weights: a rank that disagrees with the LoRA matrices would fail
    deep inside peft with a list of size mismatches."""
    if not info.is_lora or info.rank is None or info.config.get("rank_pattern"):
        return
    for key, shape in info.shapes.items():
        rank = shape[0] if ".lora_A." in key else shape[1] if ".lora_B." in key and len(shape) > 1 else None
        if rank is not None and rank != info.rank:
            raise ExportError(
                f"{info.path / 'adapter_config.json'} says r={info.rank}, but the weights have rank {rank} ({key}): "
                "the config does not belong to these weights. Restore the run's adapter/ folder (or a checkpoint's), "
                "or train again")


def require_mergeable(info: AdapterInfo, run_dir: Path | str) -> None:
    """Prompt-learning methods cannot be folded into weights: say what to do instead."""
    if info.is_prompt_learning:
        raise ExportError(
            f"{run_dir} holds a {info.peft_type} adapter, which adds learned virtual tokens instead of changing "
            f"weights, so it cannot be merged into the base model. Export the adapter on its own instead: "
            f"`{command('export', str(run_dir), '--format', 'adapter')}`"
        )


# ---------------------------------------------------------------------------------------------
# Adapter <-> base mismatch detection
# ---------------------------------------------------------------------------------------------

_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?|"
    r"lora_embedding_A|lora_embedding_B|ia3_l)$"
)


def _module_dims(module: Any) -> tuple[int, int] | None:
    """(in, out) for linear-like and embedding modules of a meta skeleton."""
    import torch

    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    return None


def _expected_shape(kind: str, dims: tuple[int, int], shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape this adapter tensor must have on a module with (in, out) = dims; None if unconstrained."""
    fan_in, fan_out = dims
    if kind == "lora_A.weight":
        return (shape[0], fan_in)
    if kind == "lora_B.weight":
        return (fan_out, shape[1]) if len(shape) == 2 else None
    if kind.startswith("lora_magnitude_vector"):
        return (fan_out,)
    if kind == "lora_embedding_A":
        return (shape[0], fan_in)
    if kind == "lora_embedding_B":
        return (fan_out, shape[1]) if len(shape) == 2 else None
    if kind == "ia3_l":
        # feed-forward modules scale inputs (1, in); the others scale outputs (out, 1)
        return (1, fan_in) if len(shape) == 2 and shape[0] == 1 and shape[1] != 1 else (fan_out, 1)
    return None


def _config_summary(config: Any) -> str:
    parts = [f"{getattr(config, 'model_type', '?')}"]
    for attr, label in (("hidden_size", "hidden"), ("num_hidden_layers", "layers"), ("vocab_size", "vocab")):
        value = getattr(config, attr, None)
        if value is not None:
            parts.append(f"{label} {value}")
    return ", ".join(parts)


def trained_base_config(info: AdapterInfo) -> Any | None:
    """The base the adapter was trained on: as its run recorded it (summary.json next to the adapter), else the
    config.json of the model the adapter names, when that is a local directory (which may have changed since)."""
    try:
        recorded = json.loads((info.path.parent / "summary.json").read_text(encoding="utf-8")).get("base_config")
    except (OSError, ValueError):
        recorded = None
    if isinstance(recorded, dict) and recorded.get("model_type"):
        return SimpleNamespace(**recorded)
    ref = info.config.get("base_model_name_or_path")
    if not ref:
        return None
    path = Path(str(ref)).expanduser()
    if not (path / "config.json").is_file():
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=False)  # a hint only: no code run, no prompt
    except Exception:  # noqa: BLE001 - a foreign or damaged config only disables this extra hint
        return None


def find_mismatches(info: AdapterInfo, base_skeleton: Any) -> list[str]:
    """Every way the adapter's tensors disagree with the base's modules (names and shapes)."""
    modules = dict(base_skeleton.named_modules())
    n_layers = getattr(base_skeleton.config, "num_hidden_layers", None)
    problems: list[str] = []
    for key, shape in sorted(info.shapes.items()):
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        match = _LORA_KEY.match(name)
        if match is None:
            # modules_to_save copies are stored under the module's own name, e.g. `lm_head.weight`.
            module_name, _, param = name.rpartition(".")
            module = modules.get(module_name)
            if module is None or info.is_prompt_learning:
                continue
            expected = getattr(module, param, None)
            if expected is not None and tuple(expected.shape) != tuple(shape):
                problems.append(
                    f"`{module_name}.{param}` has shape {list(shape)} in the adapter but {list(expected.shape)} in the base"
                )
            continue
        module_name, kind = match.group("module"), match.group("kind")
        module = modules.get(module_name)
        if module is None:
            layer = re.search(r"\.layers\.(\d+)\.", f".{module_name}.")
            if layer and n_layers is not None and int(layer.group(1)) >= n_layers:
                problems.append(f"the adapter has weights for `{module_name}`, but the base has only {n_layers} layers")
            else:
                problems.append(f"the adapter targets `{module_name}`, which the base model does not have")
            continue
        dims = _module_dims(module)
        if dims is None:
            continue
        expected_shape = _expected_shape(kind, dims, shape)
        if expected_shape is not None and tuple(expected_shape) != tuple(shape):
            problems.append(
                f"`{module_name}.{kind}` has shape {list(shape)}, but the base's {type(module).__name__} "
                f"(in {dims[0]}, out {dims[1]}) needs {list(expected_shape)}"
            )
    return problems


def check_adapter_matches_base(info: AdapterInfo, base_skeleton: Any, base_label: str) -> None:
    """Raise one clear ExportError when the adapter was trained for a different model than `base_label`."""
    problems = list(dict.fromkeys(find_mismatches(info, base_skeleton)))  # lora_A and lora_B of one missing module
    trained = trained_base_config(info)
    config = base_skeleton.config
    if trained is not None:
        for attr in BASE_CONFIG_KEYS:
            left, right = getattr(trained, attr, None), getattr(config, attr, None)
            if left is not None and right is not None and left != right:
                problems.insert(0, f"{attr}: adapter's base has {left}, this base has {right}")
    if not problems:
        return
    shown = problems[:6]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    trained_on = info.config.get("base_model_name_or_path")
    trained_text = (f" It was trained on {trained_on}" if trained_on else " Its base") + (
        f" ({_config_summary(trained)})." if trained is not None else "." if trained_on else " is not recorded.")
    what = "trained model" if info.peft_type == "FULL_MODEL" else "adapter"  # partial / full runs: `model/`
    raise ExportError(
        f"the {what} in {info.path} does not fit the base model {base_label} ({_config_summary(config)})."
        f"{trained_text} Problems:\n" + "\n".join(f"  - {p}" for p in shown) + more + "\n"
        f"Use the base model the {what} was trained on (the run's recipe.yaml `model.name`, or --base)."
    )


# ---------------------------------------------------------------------------------------------
# Serving-engine compatibility (for the adapter-only export manifest)
# ---------------------------------------------------------------------------------------------

VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for `--max-lora-rank` (vllm/config/lora.py `MaxLoRARanks`)."""
VLLM_BNB_QUANTIZATION = {"bits": 4, "quant_type": "nf4", "blocksize": 64, "double_quant": True, "keep_modules": None}
"""How vLLM's bitsandbytes loader quantizes an unquantized checkpoint (bitsandbytes_loader.py `_unquantized_generator`:
`quantize_4bit(..., compress_statistics=True, quant_type="nf4")` at bitsandbytes' default blocksize 64, on every
linear layer), in QuantizationConfig's terms."""


def serving_compatibility(info: AdapterInfo, model_type: str | None, *,
                          tied_embeddings: bool | None = None) -> dict[str, dict[str, Any]]:
    """Which engines load this adapter as a hot-swappable LoRA, and why not where they do not. `tied_embeddings`:
    the base config's `tie_word_embeddings` (None: not known), which decides whether llama.cpp can apply a LoRA on
    the output head or the token embeddings."""
    engines: dict[str, dict[str, Any]] = {}
    head_notes: list[str] = []
    if str(info.config.get("task_type", "")).upper() == "SEQ_CLS":  # a classifier: no generation engine, no merge
        why = "this is a sequence-classification adapter (a label head, no text generation)"
        engines["vllm"] = {"compatible": False, "reasons": [why], "notes": []}
        engines["llama.cpp"] = {"compatible": False, "reasons": [why], "notes": []}
        engines["transformers+peft"] = {"compatible": True, "reasons": [], "notes": [
            "`AutoPeftModelForSequenceClassification.from_pretrained(DIR)` (peft)"]}
        return engines

    reasons: list[str] = []
    notes: list[str] = []
    if not info.is_lora:
        reasons.append(f"vLLM multi-LoRA serves LoRA adapters only, this is {info.peft_type}")
    else:
        if info.use_dora:
            reasons.append("vLLM does not support DoRA (use_dora: true); merge it instead (`peftkit merge`)")
        if info.modules_to_save:
            reasons.append(
                f"vLLM rejects adapters with modules_to_save ({', '.join(info.modules_to_save)}); merge it instead"
            )
        if info.config.get("bias", "none") != "none":
            reasons.append(f"adapter has trained biases (bias: {info.config.get('bias')}), which vLLM LoRA does not load by default")
        rank = max([info.rank or 0, *(info.config.get("rank_pattern") or {}).values()])
        max_lora_rank = vllm_max_lora_rank(rank)
        if max_lora_rank is None:
            reasons.append(f"rank {rank} is above the largest --max-lora-rank vLLM accepts ({VLLM_MAX_LORA_RANKS[-1]}); "
                           "merge it instead (`peftkit merge`), or train with r <= 512")
        elif rank > VLLM_DEFAULT_MAX_LORA_RANK:
            notes.append(f"start vLLM with --max-lora-rank {max_lora_rank} (rank {rank} > default 16)")
        if info.use_rslora:
            notes.append("rsLoRA scaling (alpha/sqrt(r)) is read from adapter_config.json by vLLM")
        if info.embedding_modules:
            notes.append(f"the adapter has a LoRA on the input embeddings ({', '.join(info.embedding_modules)}), which "
                         "vLLM loads only for model classes that support embedding LoRA; in training it changed the "
                         "input lookup only, also where the output head shares that matrix (tied embeddings). Check "
                         "vLLM's answers against `peftkit chat`, or serve the merged model (`peftkit merge`)")
        notes.append("serve with `vllm serve BASE --enable-lora --lora-modules name=DIR`")
    engines["vllm"] = {"compatible": not reasons, "reasons": reasons, "notes": notes}

    reasons = []
    if not info.is_lora:
        reasons.append(f"llama.cpp/Ollama adapters are LoRA only, this is {info.peft_type}")
    else:
        if info.use_dora:
            reasons.append("llama.cpp LoRA adapters cannot express DoRA's magnitude vectors")
        if info.modules_to_save:
            reasons.append("llama.cpp LoRA adapters cannot carry fully trained modules (modules_to_save)")
        head_reasons, head_notes = _llama_cpp_head_and_embeddings(info, tied_embeddings)
        reasons += head_reasons
        if info.config.get("alpha_pattern") and len(set(info.config["alpha_pattern"].values()) | {info.alpha}) > 1:
            reasons.append("llama.cpp LoRA files hold one alpha; this adapter has per-module alphas (alpha_pattern)")
    from peftkit.export.gguf_writer import (  # gguf_writer imports this module
        GGUF_ARCHITECTURES,
        LLAMA_CPP_EMBEDDINGS_AS_HEAD,
        embeddings_as_head,
    )

    if model_type is not None and model_type not in GGUF_ARCHITECTURES:
        reasons.append(f"peftkit writes GGUF adapters for {', '.join(GGUF_ARCHITECTURES)} models (this base is {model_type})")
    elif (model_type is not None and tied_embeddings is False
          and GGUF_ARCHITECTURES[model_type].arch in LLAMA_CPP_EMBEDDINGS_AS_HEAD):
        reasons.append(f"{embeddings_as_head(GGUF_ARCHITECTURES[model_type])}, and this base has a head of its own "
                       "(tie_word_embeddings: false): in llama.cpp neither the base nor the LoRA runs as trained")
    if not reasons:
        llama_notes = ["convert with `peftkit export RUN_DIR --format gguf-adapter`; use with `llama-cli -m BASE.gguf --lora FILE`",
                       *head_notes]
        ollama_refusal = ollama_lora_refusal(model_type)
        if ollama_refusal is not None:
            llama_notes.append(ollama_refusal)
    elif info.is_prompt_learning:
        llama_notes = ["virtual tokens cannot be merged or converted; serve this adapter with transformers + peft"]
    else:
        llama_notes = ["merge it into the base instead: `peftkit export RUN_DIR --format gguf`"]
    engines["llama.cpp"] = {"compatible": not reasons, "reasons": reasons, "notes": llama_notes}
    engines["transformers+peft"] = {
        "compatible": True,
        "reasons": [],
        "notes": ["`PeftModel.from_pretrained(base_model, DIR)` (verified by peftkit at export time)", *(
            [DORA_TRANSFORMERS_NOTE] if info.use_dora else [])],
    }
    return engines


DORA_TRANSFORMERS_NOTE = (
    "load it with peft, not with transformers' own adapter loading (`AutoModelForCausalLM.from_pretrained(DIR)`, "
    "`load_adapter`): transformers 5.23 leaves DoRA's magnitude vectors out (UNEXPECTED / MISSING in its load "
    "report), and the model's outputs differ")


OUTPUT_HEAD_MODULES = ("lm_head",)
TOKEN_EMBEDDING_MODULES = ("embed_tokens", "wte")
"""Last name parts of the output head and the token embeddings (llama.cpp's `output` / `token_embd`)."""


def _llama_cpp_head_and_embeddings(info: AdapterInfo, tied_embeddings: bool | None) -> tuple[list[str], list[str]]:
    """Reasons and notes for a LoRA on the output head or the token embeddings. `gguf_lora` writes them as llama.cpp's
    convert_lora_to_gguf.py does (`output.weight.lora_*`, `token_embd.weight.lora_*`), which llama.cpp applies as
    peft did only where head and embeddings are separate matrices."""
    heads, embeddings = info.output_head_modules, info.embedding_modules
    if not heads and not embeddings:
        return [], []
    reasons = [f"llama.cpp applies an embedding LoRA to the token embeddings (token_embd.weight) only; this adapter has "
               f"one on `{module}`" for module in embeddings if module.split(".")[-1] not in TOKEN_EMBEDDING_MODULES]
    if tied_embeddings:
        tied = "the base ties its output head to the input embeddings, "
        reasons += [f"{tied}so its GGUF has no output.weight for the LoRA on `{module}` (llama.cpp fails to load the "
                    "file)" for module in heads]
        reasons += [f"{tied}which llama.cpp runs with token_embd.weight itself: it would apply the embedding LoRA on "
                    f"`{module}` to the head too (and aborts; peft changed only the input lookup)" for module in embeddings]
    adapted = ", ".join(f"`{module}`" for module in [*heads, *embeddings])
    notes = [f"the LoRA on {adapted} goes into the GGUF LoRA as output.weight / token_embd.weight tensors; the copies of "
             "those layers peft saves with it (base_layer.weight) must equal the base's weights, which the export "
             "checks before dropping them (a resized vocabulary or a changed copy is refused: use `--format gguf`)"]
    if tied_embeddings is None:
        notes.append("llama.cpp applies it only on a base whose output head is not tied to the input embeddings "
                     "(tie_word_embeddings: false); the gguf-adapter export refuses a tied one")
    return reasons, notes


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest `--max-lora-rank` vLLM accepts for an adapter of `rank`; None above the largest (vLLM refuses
    other values at startup, and adapters of a higher rank at load)."""
    return next((allowed for allowed in VLLM_MAX_LORA_RANKS if rank <= allowed), None)


def vllm_quantized_base_note(quantization: dict[str, Any]) -> str:
    """How to serve a QLoRA adapter on vLLM. vLLM quantizes a full-precision base one way only; an adapter trained on
    any other rounding of the weights would run on other weights than it learnt to correct."""
    settings = {**quantization, "keep_modules": quantization.get("keep_modules") or None}
    if settings.get("bits") != 4:  # an 8-bit record holds no 4-bit keys to compare
        return ("trained on an 8-bit (LLM.int8) base: vLLM loads the adapter, but its `--quantization bitsandbytes` "
                "quantizes a full-precision checkpoint to 4-bit nf4, so it would serve it on other weights than it "
                "trained on. Merge it (`peftkit merge`) and serve the merged model instead")
    differs = [f"{key} {settings.get(key)!r}" for key, value in VLLM_BNB_QUANTIZATION.items()
               if settings.get(key) != value]
    if not differs:
        return ("trained on a 4-bit nf4 base (blocksize 64, double quantization), which is how vLLM's bitsandbytes "
                "loader quantizes a full-precision checkpoint: for the trained behaviour serve it on the unquantized base "
                "with `--quantization bitsandbytes`, or merge it (`peftkit merge`) and serve the result")
    return (f"trained on a 4-bit base quantized otherwise than vLLM does ({', '.join(differs)}; vLLM's "
            "`--quantization bitsandbytes` quantizes every linear layer to 4-bit nf4, blocksize 64, double quantization): "
            "vLLM loads the adapter but would serve it on other weights than it trained on. Merge it (`peftkit merge`) "
            "and serve the merged model instead")


OLLAMA_ENGINE_ARCHITECTURES = frozenset({
    "bert", "deepseek2", "deepseekocr", "gemma3", "gemma3n", "gptoss", "gpt-oss", "llama4", "mistral3", "mllama",
    "nemotron_h", "nemotron_h_moe", "nomic-bert", "olmo3", "qwen25vl", "qwen3", "qwen3moe", "qwen35", "qwen35moe",
    "qwen3next", "qwen3vl", "qwen3vlmoe", "glm4moelite", "glmocr", "lfm2", "lfm2moe",
})
"""GGUF architectures Ollama always runs on its own engine (fs/ggml/ggml.go `OllamaEngineRequired`), whose runner
refuses an ADAPTER with "loras are not yet implemented" (runner/ollamarunner/runner.go); llama.cpp loads them."""


def ollama_loads_gguf_lora(model_type: str | None) -> bool:
    """Whether Ollama applies a GGUF LoRA (a Modelfile's ADAPTER line) on a base of this transformers `model_type`."""
    if model_type is None:
        return True
    from peftkit.models.gguf_config import GGUF_ARCHITECTURES

    layout = GGUF_ARCHITECTURES.get(model_type)
    arch = layout.arch.lower() if layout is not None else model_type.removesuffix("_text").replace("_", "")
    return arch not in OLLAMA_ENGINE_ARCHITECTURES


def ollama_lora_refusal(model_type: str | None, run_dir: str = "RUN_DIR") -> str | None:
    """Why Ollama will not run a GGUF LoRA on this base and what to ship instead; None where Ollama loads it."""
    if ollama_loads_gguf_lora(model_type):
        return None
    return (f"Ollama runs {model_type} models on its own engine, which does not load ADAPTER files (it fails with "
            f"\"loras are not yet implemented\"; llama.cpp itself does load it: `llama-cli -m BASE.gguf --lora FILE`). "
            f"For Ollama export the merged model: `peftkit export {shlex.quote(str(run_dir))} --format gguf`")
