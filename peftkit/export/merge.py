"""Fold a trained adapter into its base model's weights (LoRA, DoRA, rsLoRA, IA3; QLoRA; weighted mixes).

Merging always happens in float32 on the CPU (cheap next to training, and exact); the caller
casts to the export dtype afterwards. Next to the merged model we keep a *reference*: the unmerged
adapter model's logits and greedy answers on a fixed prompt set, which every export is checked against.

QLoRA: the adapter learned to correct the 4-bit weights, so by default it is merged into
dequant(quant(W)), which reproduces the adapter-on-4-bit model to float rounding. Merging into the
original full-precision W is offered too; both errors are measured and reported.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from peftkit.config.schema import ModelConfig, QuantizationConfig, Recipe
from peftkit.errors import ExportError, ModelNotFoundError
from peftkit.export.compat import (AdapterInfo, check_adapter_matches_base, read_adapter, require_mergeable,
                                   trained_base_config)
from peftkit.export.verify import RELATIVE_TOLERANCE, Reference, build_reference, conversations_for, max_abs_diff
from peftkit.models.resolve import ModelSource
from peftkit.runs import no_quantized_base, trained_model_dir
from peftkit.utils.command_name import command

log = logging.getLogger(__name__)

QLoraBase = Literal["dequantized", "original"]
COMBINATIONS = ("cat", "linear", "svd")


@dataclass
class RunAdapter:
    """A run directory resolved to everything a merge needs, before any weights are loaded."""

    run_dir: Path
    recipe: Recipe
    info: AdapterInfo
    model_cfg: ModelConfig
    source: ModelSource
    quantization: QuantizationConfig | None
    base_config: Any
    other_base: bool = False
    """The base has the trained one's shapes but other weights (its fingerprint differs): warned, and said in cards."""


@dataclass
class MergedModel:
    model: Any
    """The merged transformers model (float32, CPU, no adapter layers left)."""
    tokenizer: Any
    runs: list[RunAdapter]
    reference: Reference
    """The unmerged adapter model on the base the merge used; exports are compared with it."""
    merge_max_abs_diff: float
    """In-process check: merged model vs the reference, before anything is written."""
    qlora: dict[str, Any] | None = None
    combination: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def primary(self) -> RunAdapter:
        return self.runs[0]


def merge_failed(merged: MergedModel, failures: list[str], export: str) -> str:
    """The refusal of an `export` ("a GGUF of it") of a merge that does not reproduce the unmerged adapter."""
    return (f"the merged model does not reproduce {merged.reference.label}: {'; '.join(failures)}, so {export} would "
            "not be the trained model. An adapter on a layer that shares its weight with another (a tied output head) "
            "cannot be merged: train that layer with `modules_to_save` instead; or ship the adapter itself "
            "(`--format adapter`)")


def check_merge_in_memory(merged: MergedModel) -> None:
    """The merge (float32, in memory: `merge_max_abs_diff`) judged at float32's tolerance before an export is
    written. The export's own check compares the written files with the merged model at their precision, which in
    bfloat16 (10 % of the largest logit, no greedy agreement) a merge that lost its adapter passed. QLoRA merges are
    judged in `qlora`, against the adapter on its quantized base."""
    if merged.qlora is not None:
        return
    tolerance = RELATIVE_TOLERANCE["float32"] * max(1.0, max(float(t.abs().max()) for t in merged.reference.logits))
    if not merged.merge_max_abs_diff <= tolerance:  # also catches NaN
        raise ExportError(merge_failed(merged, [f"max abs logit diff {merged.merge_max_abs_diff:.3g} > tolerance "
                                                f"{tolerance:.3g} (float32, in memory)"], "an export of it"))


FULL_MODEL = "FULL_MODEL"
"""Pseudo peft type for runs that trained the weights themselves (methods `full`, `partial`): RUN_DIR/model."""


def refuse_other_tasks(run_dir: Path, recipe: Recipe) -> None:
    """Merge, the exports and their verification handle causal language models: a classifier run is refused,
    with the way to load what it trained."""
    task = getattr(recipe, "task", "causal_lm")
    if task == "causal_lm":
        return
    full = trained_model_dir(run_dir)
    use = (f"{full} is the trained classifier itself: load it with transformers' "
           "AutoModelForSequenceClassification.from_pretrained" if full is not None else
           "Load its adapter with peft's AutoPeftModelForSequenceClassification, or "
           f"`{command('export', str(run_dir), '--format', 'adapter', '--no-verify')}` for the adapter files")
    raise ExportError(f"{run_dir} is a {task} run; merge/export (and their verification) handle causal language "
                      f"models. {use}")


def resolve_run(run_dir: str | Path, base: str | None = None, *, require_causal_lm: bool = True) -> RunAdapter:
    """Recipe + adapter + base reference, with the adapter/base fit checked from files only."""
    from peftkit.adapters import effective_quantization
    from peftkit.data.classification import load_kwargs
    from peftkit.models import resolve_model_ref
    from peftkit.models.fingerprint import warn_if_other_base
    from peftkit.models.skeleton import model_skeleton
    from peftkit.runs import adapter_dir, read_run_recipe, refuse_unfinished

    run_dir = Path(run_dir).expanduser().resolve()
    recipe = read_run_recipe(run_dir)
    task = getattr(recipe, "task", "causal_lm")
    full = trained_model_dir(run_dir)
    if require_causal_lm:
        refuse_other_tasks(run_dir, recipe)
    if full is not None:
        refuse_unfinished(run_dir, full)
        info = AdapterInfo(full, {"peft_type": FULL_MODEL, "method": getattr(recipe.adapter, "method", "full")})
    else:
        info = read_adapter(adapter_dir(run_dir))
    if full is not None and base is not None:
        log.warning("--base %s is not used: %s is a %s run, and its trained model %s holds every weight", base,
                    run_dir, info.config["method"], full)
        base = None
    if base is not None and Path(base).expanduser().exists():  # a local folder: cards and manifests name it wherever read
        base = str(Path(base).expanduser().resolve())
    model_cfg = recipe.model if base is None else recipe.model.model_copy(update={"name": base})
    try:
        source = resolve_model_ref(model_cfg.name, revision=model_cfg.revision, allow_pickle=model_cfg.allow_pickle)
    except ModelNotFoundError as exc:
        if full is not None:  # a full / partial run needs no base: its own model stands in for it
            log.warning("%s, the base model this run was trained from, is not available here; its trained model %s "
                        "holds every weight and is used on its own", model_cfg.name, full)
            log.debug("the base model: %s", exc)
            source = resolve_model_ref(str(full), allow_pickle=model_cfg.allow_pickle)
        elif base is None:  # the base was moved or deleted since training: --base exists for exactly this
            raise ModelNotFoundError(f"{exc}. The run was trained on it: put the base model back, or pass "
                                     "`--base PATH` with where it is now") from None
        else:
            raise ModelNotFoundError(f"--base {base}: {exc}".replace("set `model.name: DIR`", "pass `--base DIR`")) from None
    # a classifier's adapter may target its pooler, and its head has the run's label count
    labels = load_kwargs(run_dir, recipe).get("num_labels")
    skeleton = model_skeleton(source, model_cfg, task=task, num_labels=labels)
    check_adapter_matches_base(info, skeleton, model_cfg.name)
    # same shapes, other weights (a fine-tune, an edited copy)
    other_base = source.path != full and warn_if_other_base(run_dir, source, model_cfg.name)
    return RunAdapter(run_dir, recipe, info, model_cfg, source, effective_quantization(recipe), skeleton.config,
                      other_base)


def load_run_tokenizer(run: RunAdapter, trained: Any = None) -> Any:
    """The tokenizer saved with the run (it carries the chat template used in training; `trained` when it is already
    loaded), with the recipe's `data.system_prompt` as the template's default: exports answer as the trained chatbot
    when a client sends no system message, as the Ollama Modelfile's SYSTEM line does."""
    from peftkit.models.load import set_default_system_prompt

    tokenizer = trained if trained is not None else _trained_tokenizer(run)
    set_default_system_prompt(tokenizer, run.recipe.data.system_prompt)
    template = tokenizer.chat_template
    if isinstance(template, str) and template:
        tokenizer.chat_template = BLANK_SYSTEM_DROPPED + template
    elif isinstance(template, dict):
        tokenizer.chat_template = {name: BLANK_SYSTEM_DROPPED + one for name, one in template.items()}
    return tokenizer


def _trained_tokenizer(run: RunAdapter) -> Any:
    """The tokenizer the run trained with, its chat template as training rendered it (no system prompt added)."""
    from peftkit.runs import read_run_tokenizer

    return read_run_tokenizer(run.run_dir, run.model_cfg, run.source)


BLANK_SYSTEM_DROPPED = (
    "{% if messages and messages[0]['role'] == 'system' and (messages[0]['content'] is not defined or "
    "messages[0]['content'] is none or (messages[0]['content'] is string and not messages[0]['content'].strip())) %}"
    "{% set messages = messages[1:] %}{% endif %}")
"""Put before an exported chat template: a leading system message that is empty or only spaces counts as none (the
recipe's system prompt, or the template's own default, takes its place), as in training and `peftkit chat`
(data/chat.py with_system_prompt) instead of rendering an empty system turn."""


def _load_base(run: RunAdapter, quantized: bool) -> Any:
    from peftkit.models import load_model

    model = load_model(run.model_cfg, run.quantization if quantized else None, device="cpu", dtype=torch.float32,
                       source=run.source)
    model.eval()
    return model


def dequantized(model: Any) -> Any:
    """`model.dequantize()` in float32, with GPT-2-style `Conv1D` layers given back their own class.

    transformers loads a Conv1D layer into bitsandbytes as a (transposed) 4/8-bit Linear, and
    dequantize() leaves an nn.Linear with an (out, in) weight there, which the saved model's own
    Conv1D (in, out) cannot reload. A meta-device copy of the architecture says where they were."""
    from transformers.pytorch_utils import Conv1D

    model = model.dequantize(dtype=torch.float32)
    try:
        with torch.device("meta"):
            skeleton = type(model)(model.config)
    except Exception as exc:  # noqa: BLE001 - custom (remote-code) classes: nothing to restore is the common case
        log.debug("no meta-device copy of %s (%s); Conv1D layers not checked", type(model).__name__, exc)
        return model
    for name, module in skeleton.named_modules():
        layer = model.get_submodule(name) if isinstance(module, Conv1D) else None
        if isinstance(layer, torch.nn.Linear):
            conv = Conv1D(layer.out_features, layer.in_features)
            with torch.no_grad():
                conv.weight.copy_(layer.weight.t())
                conv.bias.copy_(layer.bias if layer.bias is not None else torch.zeros(layer.out_features))
            model.set_submodule(name, conv)
    return model


def _attach(base: Any, adapter: Path) -> Any:
    from peft import PeftModel

    from peftkit.adapters.lora import tied_adapter_warning_said

    with tied_adapter_warning_said():  # said at training
        model = PeftModel.from_pretrained(base, str(adapter))
    model.eval()
    return model


def merged_model(peft_model: Any, *, say_untie: bool = True, **kwargs: Any) -> Any:
    """peft's `merge_and_unload`, keeping a tied output head out of a LoRA on the input embeddings.

    In training such a LoRA changes only the embedding lookup: the head shares the base's matrix, not the adapter
    layer. Merging in place would add the delta to the head too (one tensor), so the head gets its own copy first;
    peft's merge then sees the two differ and unties them in the config (`tie_word_embeddings: false`), as it does for
    `modules_to_save: [lm_head]` on a tied base. The merged model is one output matrix larger.
    `say_untie=False` keeps the untie note out of the log (a second merge of the same adapter, QLoRA's)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = peft_model.get_base_model()
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    head, tokens = base.get_output_embeddings(), base.get_input_embeddings()
    said = False
    if isinstance(tokens, BaseTunerLayer) and head is not None and isinstance(getattr(head, "weight", None), torch.Tensor):
        if head.weight.data_ptr() == tokens.get_base_layer().weight.data_ptr():
            if say_untie:
                log.info("The adapter changes the input embeddings, which the output head shares: the merged model keeps "
                         "the head's original weight as a matrix of its own (tie_word_embeddings: false), as in training")
            head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
            said = True
    with warnings.catch_warnings():  # peft's advice to untie by hand (done here), and its note that it untied
        warnings.filterwarnings("ignore", message=r"Model with `tie_word_embeddings=True` and the tied_target_modules",
                                category=UserWarning)
        warnings.filterwarnings("ignore", message=r"Input and output embeddings are no longer tied after merging",
                                category=UserWarning)
        merged = peft_model.merge_and_unload(**kwargs)
    if say_untie and tied and not said and not getattr(merged.config, "tie_word_embeddings", True):
        log.info("The adapter trained the input embeddings or the output head, which the base shares: the merged "
                 "model has a head of its own (tie_word_embeddings: false), as in training")
    return merged


def _clean_config(model: Any, name: str) -> Any:
    """A merged model is a plain checkpoint: no quantization or peft leftovers in its config."""
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.config.name_or_path = name
    return model


def _reference(model: Any, tokenizer: Any, run: RunAdapter, label: str) -> Reference:
    conversations = conversations_for(run.recipe.data.system_prompt, run.recipe.eval.sample_prompts)
    return build_reference(model, tokenizer, conversations, label=label, data_texts=run_data_texts(run))


DATA_TEXTS = 200
"""Texts of a run's own data whose tokenization an export compares with llama.cpp's (cheap: no model runs)."""
DATA_BYTES_READ = 32 * 2**20
"""Training data larger than this (a gzip'd file counted at 8x) is not read for those texts, nor a dataset folder
(the held-out questions and replies still are)."""


def _readable_size(source: str | Path) -> float:
    """About how many bytes reading `source` parses; a folder (a `save_to_disk` dataset) counts as too many."""
    path = Path(source)
    if not path.is_file():
        return float("inf")
    return path.stat().st_size * (8 if path.suffix.lower() == ".gz" else 1)


def run_data_texts(run: RunAdapter, limit: int = DATA_TEXTS) -> list[str]:
    """Message texts of the run's training data and its held-out questions and replies, each cut to 500
    characters. The fixed verification prompts are English: llama.cpp splits some other scripts' text differently
    (a space before an Arabic-Indic digit). Data that cannot be read here (moved, a Hub dataset offline) is
    skipped: this is a check, not a requirement."""
    import json

    from peftkit.data.files import data_sources
    from peftkit.data.formats import load_examples
    from peftkit.data.hub import is_hub_ref
    from peftkit.errors import PeftkitError

    texts: list[str] = []
    sources = data_sources(run.recipe.data.train)
    if not any(is_hub_ref(s) for s in sources) and sum(map(_readable_size, sources)) <= DATA_BYTES_READ:
        try:
            for example in load_examples(sources, run.recipe.data.format, run.recipe.data.columns):
                texts += ([str(m.get("content") or "") for m in example.messages] if example.messages is not None
                          else [example.text or ""])
                if len(texts) >= limit:
                    break
        except (PeftkitError, OSError, ValueError):
            pass
    heldout = run.run_dir / "heldout.jsonl"
    if heldout.is_file():
        with contextlib.suppress(OSError, ValueError):
            for line in heldout.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                texts += [str(record.get("question") or ""), str(record.get("reply") or "")]
    unique = dict.fromkeys(t[:500] for t in texts if t.strip())
    return list(unique)[:limit]


def merge_run(run_dir: str | Path, *, qlora_base: QLoraBase = "dequantized", base: str | None = None) -> MergedModel:
    """Merge the run's adapter into its base; measure the merge against the unmerged adapter model."""
    if qlora_base not in ("dequantized", "original"):
        raise ExportError(f"--qlora-base must be `dequantized` or `original`, got {qlora_base!r}")
    run = resolve_run(run_dir, base)
    require_mergeable(run.info, run.run_dir)
    if qlora_base == "original" and run.quantization is None:  # as `eval` and `chat` refuse it
        raise ExportError(no_quantized_base(f"{run.run_dir} was"))
    if run.info.peft_type == FULL_MODEL:
        raise ExportError(
            f"{run.run_dir} trained the model's weights directly (method {run.info.config['method']}), so there is no "
            f"adapter to merge or combine; `{command('export', str(run.run_dir), '--format', 'hf')}` writes its model "
            "with the tokenizer, and `--format gguf` for llama.cpp / Ollama"
        )
    tokenizer = load_run_tokenizer(run)
    adapter = run.info.path
    if run.quantization is None:
        peft_model = _attach(_load_base(run, quantized=False), adapter)
        reference = _reference(peft_model, tokenizer, run, f"{run.info.method} adapter on the float32 base (unmerged)")
        merged = merged_model(peft_model)
        qlora = None
    else:
        merged, reference, qlora = _merge_qlora(run, tokenizer, qlora_base)
    _clean_config(merged, f"{run.run_dir.name}-merged")
    diff = max_abs_diff(merged, reference)
    log.info("Merged %s into %s: max |logit diff| vs the unmerged adapter = %.3g", run.info.method, run.model_cfg.name, diff)
    return MergedModel(merged, tokenizer, [run], reference, diff, qlora=qlora)


def shipped_model(run_dir: str | Path, *, qlora_base: QLoraBase = "dequantized", base: str | None = None) -> MergedModel:
    """The model a run ships as: its adapter merged into the base, or a full / partial run's own trained model."""
    if trained_model_dir(Path(run_dir).expanduser().resolve()) is not None:
        return load_trained_model(run_dir, base)
    return merge_run(run_dir, qlora_base=qlora_base, base=base)


def load_trained_model(run_dir: str | Path, base: str | None = None) -> MergedModel:
    """A `full`/`partial` run's own model, in the shape of a merge result (for GGUF export)."""
    from peftkit.models import load_model, resolve_model_ref

    run = resolve_run(run_dir, base)
    if run.info.peft_type != FULL_MODEL:
        raise ExportError(f"{run.run_dir} has an adapter, not a trained model directory; use merge_run")
    tokenizer = load_run_tokenizer(run)
    model = load_model(run.model_cfg, None, device="cpu", dtype=torch.float32,
                       source=resolve_model_ref(str(run.info.path))).eval()
    reference = _reference(model, tokenizer, run, f"the trained model ({run.info.config['method']}, float32)")
    return MergedModel(_clean_config(model, f"{run.run_dir.name}-model"), tokenizer, [run], reference, 0.0)


def _merge_qlora(run: RunAdapter, tokenizer: Any, qlora_base: QLoraBase) -> tuple[Any, Reference, dict[str, Any]]:
    """Both QLoRA merge targets, each measured against the adapter on the quantized base (what was trained)."""
    assert run.quantization is not None
    bits = run.quantization.bits
    adapter = run.info.path
    # computed in float32 like the merge: a bfloat16 compute_dtype (a GPU run's) rounds each matmul, which no float32
    # merged model reproduces and which is no merge error
    exact = replace(run, quantization=run.quantization.model_copy(update={"compute_dtype": "float32"})) if bits == 4 else run
    on_quantized = _attach(_load_base(exact, quantized=True), adapter)
    reference_q = _reference(on_quantized, tokenizer, run, f"{run.info.method} adapter on the {bits}-bit base, as trained")
    # unload() restores the bitsandbytes layers untouched; dequantize() turns them into float32 nn.Linear.
    on_dequantized = _attach(dequantized(on_quantized.unload()), adapter)
    # 8-bit layers also quantize their *inputs* (LLM.int8), which no float32 model reproduces: the merged 8-bit run
    # is checked against the adapter on the dequantized weights (what it must equal), the int8 gap reported apart.
    reference_deq = (_reference(on_dequantized, tokenizer, run, f"{run.info.method} adapter on the dequantized {bits}-bit base")
                     if bits == 8 else None)
    merged_deq = merged_model(on_dequantized)
    error_deq = max_abs_diff(merged_deq, reference_q)

    on_original = _attach(_load_base(run, quantized=False), adapter)
    reference_orig = None
    if qlora_base == "original":
        reference_orig = _reference(on_original, tokenizer, run, f"{run.info.method} adapter on the original float32 base")
    merged_orig = merged_model(on_original, say_untie=False)
    error_orig = max_abs_diff(merged_orig, reference_q)

    qlora = {
        "base": qlora_base,
        "quantization": run.quantization.model_dump(),
        "reference": reference_q.label,
        "dequantized_max_abs_diff": error_deq,
        "original_max_abs_diff": error_orig,
        "prompts": len(reference_q.texts),
    }
    log.info("QLoRA merge, max |logit diff| vs the adapter on the %d-bit base: dequantized %.3g, original %.3g",
             bits, error_deq, error_orig)
    if qlora_base == "dequantized":
        del merged_orig
        return merged_deq, reference_deq or reference_q, qlora
    del merged_deq
    assert reference_orig is not None
    return merged_orig, reference_orig, qlora


# ---------------------------------------------------------------------------------------------
# Weighted combination of several LoRA adapters
# ---------------------------------------------------------------------------------------------


def _normalized_lora_config(info: AdapterInfo) -> Any:
    """The adapter's LoraConfig with rsLoRA scaling re-expressed as plain alpha/r.

    peft's `add_weighted_adapter` copies the first adapter's config for the result; with rsLoRA that
    would rescale the combined adapter by sqrt(rank). Same scaling, stated the classic way, avoids it.
    """
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(str(info.path))
    if config.use_rslora:
        if config.alpha_pattern or config.rank_pattern:
            raise ExportError(
                f"{info.path}: combining rsLoRA adapters with per-module rank/alpha patterns is not supported; "
                "merge the runs one at a time instead"
            )
        config.lora_alpha = config.lora_alpha * math.sqrt(config.r)
        config.use_rslora = False
    config.inference_mode = True
    return config


def _bases_differ(a: AdapterInfo, b: AdapterInfo) -> str | None:
    """How the bases two LoRA adapters were trained on differ (as their runs recorded them: `num_hidden_layers: 2
    against 30`; else the first layer whose size the adapters disagree on, lora_A's input width or lora_B's output
    width, which the base fixes: `q_proj: 64 against 576`); None where nothing tells them apart."""
    from peftkit.models.fingerprint import BASE_CONFIG_KEYS

    configs = trained_base_config(a), trained_base_config(b)
    if all(config is not None for config in configs):
        for key in BASE_CONFIG_KEYS:
            values = [getattr(config, key, None) for config in configs]
            if None not in values and values[0] != values[1]:
                return f"{key}: {values[0]} against {values[1]}"
    for key in sorted(a.shapes.keys() & b.shapes.keys()):
        axis = 1 if ".lora_A." in key else 0 if ".lora_B." in key else None
        first, second = a.shapes[key], b.shapes[key]
        if axis is not None and len(first) == len(second) == 2 and first[axis] != second[axis]:
            name = key.split(".lora_")[0].rsplit(".", 1)[-1]
            return f"{name}: {first[axis]} against {second[axis]}"
    return None


def combine_runs(run_dirs: list[str | Path], weights: list[float] | None = None, *, combination: str = "cat",
                 base: str | None = None, qlora_base: QLoraBase = "dequantized") -> MergedModel:
    """Merge a weighted combination of LoRA adapters trained on the same base into one model.

    `cat` (default) stacks the adapters, so the merged delta is exactly sum_i w_i * delta_i. `linear`
    averages A and B matrices separately (needs equal ranks) and mixes cross terms; `svd` re-factorises.
    """
    if len(run_dirs) < 2:
        raise ExportError("--adapters needs at least two run directories to combine "
                          f"(use `{command('merge', 'RUN_DIR')}` for one)")
    weights = list(weights) if weights else [1.0 / len(run_dirs)] * len(run_dirs)
    if len(weights) != len(run_dirs):
        raise ExportError(f"--weights has {len(weights)} values for {len(run_dirs)} adapters; give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise ExportError(f"--weights must be finite numbers, got {' '.join(map(str, weights))}")
    if combination not in COMBINATIONS:
        raise ExportError(f"--combination must be one of {', '.join(COMBINATIONS)}, got {combination!r}")
    runs = [resolve_run(r, base) for r in run_dirs]
    first = runs[0]
    for run in runs:
        require_mergeable(run.info, run.run_dir)
        if not run.info.is_lora or run.info.use_dora:
            raise ExportError(
                f"{run.run_dir}: only LoRA/rsLoRA adapters can be combined (this one is {run.info.method}); "
                f"merge it on its own with `{command('merge', 'RUN_DIR')}`"
            )
        if run.info.config.get("modules_to_save"):
            raise ExportError(
                f"{run.run_dir} also trained whole modules ({', '.join(run.info.config['modules_to_save'])}, "
                "adapter.modules_to_save), which a weighted combination of LoRA deltas cannot mix (peft would keep "
                f"one run's copy or the base's); merge it on its own with `{command('merge', 'RUN_DIR')}`"
            )
        if run.source.path != first.source.path or run.source.ref != first.source.ref:
            differ = _bases_differ(run.info, first.info)
            raise ExportError(
                f"{run.run_dir} was trained on {run.model_cfg.name}, but {first.run_dir} on {first.model_cfg.name}; "
                "only adapters of the same base model can be combined " + (
                    f"(their bases differ, {differ}, so no one base fits both)" if differ else
                    "(where both are copies of one model, pass --base to use one of them)"))
        if run.quantization != first.quantization:
            raise ExportError(f"{run.run_dir} and {first.run_dir} were trained with different quantization; combine "
                              "adapters trained the same way")
    if qlora_base == "original" and first.quantization is None:  # as a single run's merge refuses it
        raise ExportError(no_quantized_base("these runs were"))
    if qlora_base != "dequantized" and first.quantization is not None:
        raise ExportError(f"--qlora-base {qlora_base} applies to one run (`{command('merge', 'RUN_DIR')}`); combined "
                          f"QLoRA adapters are merged into the dequantized {first.quantization.bits}-bit weights they "
                          "were trained against: leave the option out")
    _check_same_placement(runs)
    trained = [_trained_tokenizer(r) for r in runs]
    templates = [t.chat_template for t in trained]  # as trained; other system prompts: warned below
    other = next((r for r, t in zip(runs, templates) if t != templates[0]), None)
    if other is not None:
        raise ExportError(
            f"{first.run_dir} and {other.run_dir} were "
            "trained with different chat templates (model.chat_template or the tokenizer's own); a combined model has "
            "one, and an adapter answers well only in the format it learnt: combine runs trained with the same "
            "template")
    ranks = [r.info.rank for r in runs]
    if combination == "linear" and len(set(ranks)) > 1:
        raise ExportError(f"--combination linear needs equal ranks, got {ranks}; use `cat` (exact) instead")

    if len({r.recipe.data.system_prompt for r in runs}) > 1:
        log.warning("The runs were trained with different data.system_prompt values; the combined model's chat template "
                    "defaults to the first one's (%r). Clients can send their own system message.",
                    first.recipe.data.system_prompt)
    tokenizer = load_run_tokenizer(first, trained[0])
    base_model = _load_base(first, quantized=first.quantization is not None)
    if first.quantization is not None:
        base_model = dequantized(base_model)  # the weights the adapters were trained against
    from peft import PeftModel

    names = [f"adapter_{i}" for i in range(len(runs))]
    model = PeftModel.from_pretrained(base_model, str(first.info.path), adapter_name=names[0],
                                      config=_normalized_lora_config(first.info))
    for name, run in zip(names[1:], runs[1:]):
        model.add_adapter(name, _normalized_lora_config(run.info))
        model.load_adapter(str(run.info.path), adapter_name=name)
    try:
        model.add_weighted_adapter(names, weights, adapter_name="combined", combination_type=combination)
    except ValueError as exc:
        raise ExportError(f"peft could not combine the adapters ({combination}): {exc}") from None
    model.set_adapter("combined")
    model.eval()
    label = f"weighted {combination} combination of {len(runs)} adapters (unmerged)"
    reference = _reference(model, tokenizer, first, label)
    merged = merged_model(model, adapter_names=["combined"])
    _clean_config(merged, f"{first.run_dir.name}-combined")
    diff = max_abs_diff(merged, reference)
    info = {
        "runs": [str(r.run_dir) for r in runs],
        "weights": weights,
        "combination": combination,
        "ranks": ranks,
        "methods": [r.info.method for r in runs],
    }
    if first.quantization is not None:
        info.update(qlora_base="dequantized", bits=first.quantization.bits)
        log.info("QLoRA adapters combined in the dequantized %d-bit weights they were trained against",
                 first.quantization.bits)
    return MergedModel(merged, tokenizer, runs, reference, diff, combination=info)


PLACEMENT_KEYS = {"layers_to_transform": ("adapter.layers", "all"), "layers_pattern": ("the layers pattern", "none"),
                  "exclude_modules": ("excluded modules", "none")}
"""LoraConfig fields that peft's add_weighted_adapter copies from the first adapter to the combination: a run that
differs in one would lose the updates outside the first run's placement (or fail after the base has loaded)."""


def _check_same_placement(runs: list[RunAdapter]) -> None:
    """Refuse, before loading the base, adapters that peft would combine wrongly or only after loading."""
    first = runs[0]

    config = getattr(first.base_config, "text_config", None) or first.base_config
    every_layer = list(range(getattr(config, "num_hidden_layers", None) or 0))

    def placement(run: RunAdapter, key: str) -> Any:
        value = run.info.config.get(key)  # peft saves a set (exclude_modules) in any order
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        value = sorted(value) if isinstance(value, list) and value else (value or None)
        return None if key == "layers_to_transform" and value == every_layer else value  # every layer: as unset

    for run in runs[1:]:
        for key, (name, unset) in PLACEMENT_KEYS.items():
            if placement(run, key) != placement(first, key):
                raise ExportError(
                    f"{first.run_dir} and {run.run_dir} place their adapters differently ({name}: "
                    f"{placement(first, key) or unset} against {placement(run, key) or unset}); a weighted combination "
                    "keeps one placement and would drop the other run's updates outside it: combine runs trained on "
                    "the same layers, or merge them one at a time")
        regex = [isinstance(r.info.config.get("target_modules"), str) for r in (first, run)]
        if regex[0] != regex[1]:
            raise ExportError(
                f"{first.run_dir} and {run.run_dir} name their target modules differently (one a regular expression, "
                "the other a list of names), which peft cannot combine: train both with a list (e.g. "
                "adapter.target_modules: [q_proj, v_proj]) or both with the same kind")
