"""The LoRA adapter alone as a GGUF LoRA file, for `llama-cli -m BASE.gguf --lora FILE` (and Ollama's ADAPTER).

Tensor names, Q/K permutation and types follow the model GGUF (`gguf_writer`); the file is verified by
rebuilding each weight delta the way llama.cpp applies it and comparing logits with the adapter. peft keeps
lora_A as (r, in) and lora_B as (out, r) for GPT-2's Conv1D layers too (it only transposes their merged delta),
so they are written as for a linear layer.
"""

from __future__ import annotations

import logging
import math
import re
import shlex
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftkit.errors import ExportError
from peftkit.export import llama_cpp_check, verify
from peftkit.export.compat import ollama_lora_refusal
from peftkit.export import output_lock
from peftkit.export.common import (ExportResult, disk_full_as_error, gguf_package, list_files, prepare_output, write_verification)
from peftkit.export.gguf_types import ADAPTER_GGUF_TYPES
from peftkit.export.gguf_writer import (
    LLAMA_CPP_EMBEDDINGS_AS_HEAD,
    add_model_parameters,
    check_architecture,
    gguf_types,
    merge_unties_head,
    model_arch,
    permute_for,
    quantize_array,
    slug,
    source_gguf_of,
    stored_transposed,
    unpermute_for,
)
from peftkit.export.merge import RunAdapter, resolve_run
from peftkit.export.ollama import ollama_modelfile
from peftkit.utils.atomic import atomic_directory, atomic_write_text
from peftkit.utils.command_name import command

log = logging.getLogger(__name__)
ADAPTER_TYPES_WHY = "--format gguf-adapter (its LoRA matrices are small; the base GGUF is what is quantized)"
"""Why a GGUF LoRA takes fewer `--gguf-type`s than a model GGUF, said where another is asked for."""

_LORA_TENSOR = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_EMBEDDING_LORA_TENSOR = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_embedding_(?P<ab>[AB])$")
_BASE_LAYER_COPY = re.compile(r"^base_model\.model\.(?P<module>.+)\.base_layer\.weight$")
TOKEN_EMBEDDINGS, OUTPUT_HEAD = "token_embd.weight", "output.weight"
"""The GGUF tensors of the input embeddings and the (untied) output head."""


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


def _base_weights(run: RunAdapter, names: list[str]) -> dict[str, torch.Tensor]:
    """The base's own weights `names` (Hugging Face parameter names), read from its safetensors files; the whole
    model is loaded only where the files do not have them (a hub model not in the cache, pickled weights)."""
    from peftkit.models.safetensors_files import SafetensorsWeights
    from peftkit.models.resolve import materialize

    folder = Path(materialize(run.source))
    weights = SafetensorsWeights(folder) if folder.is_dir() else None
    found = {}
    for hf_name in names:
        tensor = weights.get(hf_name) if weights is not None else None
        if tensor is not None:
            found[hf_name] = tensor
    if len(found) < len(names):
        from peftkit.export.merge import _load_base

        state = _load_base(run, quantized=False).state_dict()
        found.update({hf_name: state[hf_name] for hf_name in names if hf_name not in found and hf_name in state})
    return found


def _reason(refused: ExportError) -> str:
    """The first sentence of a model GGUF export's refusal: what is wrong, without its advice (about a model, not
    an adapter)."""
    return str(refused).split(". ")[0]


def merged_gguf_advice(run: RunAdapter) -> str:
    """What to do instead of a GGUF LoRA: the merged GGUF, unless the model GGUF export would refuse this run too
    (an architecture or RoPE it does not write, a setting llama.cpp runs otherwise, a Gemma 2 merge that unties
    the head); then the ways that serve it as trained."""
    config = run.base_config
    try:
        layout = check_architecture(config)  # with RoPE: what the merged export checks
        why = merge_unties_head(run) if layout.arch in LLAMA_CPP_EMBEDDINGS_AS_HEAD else None
        if why is not None:
            raise ExportError(f"{why}, and llama.cpp runs a {config.model_type} model's output head with the token "
                              "embeddings")
    except ExportError as refused:
        return (f"a merged GGUF is refused too ({_reason(refused)}), so serve it with vLLM or transformers + peft "
                f"(`{command('export', str(run.run_dir), '--format', 'adapter')}`, or `--format hf` merged)")
    return f"use `{command('export', str(run.run_dir), '--format', 'gguf')}` (merged) instead"


def check_head_and_embedding_loras(run: RunAdapter, gguf_names: dict[str, str], embeddings: set[str],
                                   copies: dict[str, torch.Tensor]) -> None:
    """Refuse a LoRA on the output head or token embeddings that llama.cpp would not apply as peft does.

    With such a LoRA peft also saves the layer's own weights (`base_layer.weight`, `save_embedding_layers="auto"`).
    A GGUF LoRA holds only the low-rank update, so it is applied to the base GGUF's matrix: right only where that
    copy is the base's weight unchanged (no resized vocabulary), which is what llama.cpp's convert_lora_to_gguf.py
    takes for granted when it skips these tensors.
    """
    merged = merged_gguf_advice(run)
    for module in sorted(embeddings):
        if gguf_names[module] != TOKEN_EMBEDDINGS:
            raise ExportError(f"the adapter has an embedding LoRA on `{module}` ({gguf_names[module]}), and llama.cpp "
                              f"applies one to the token embeddings ({TOKEN_EMBEDDINGS}) only; {merged}")
    if getattr(run.base_config, "tie_word_embeddings", False):
        for module, gguf_name in sorted(gguf_names.items()):
            if gguf_name == OUTPUT_HEAD:
                raise ExportError(f"this base ties its output head to the input embeddings, so its GGUF has no "
                                  f"{OUTPUT_HEAD} for the LoRA on `{module}` (llama.cpp fails to load the file); "
                                  f"{merged}")
            if gguf_name == TOKEN_EMBEDDINGS:  # llama-adapter.cpp finds a LoRA by tensor name, the head's included
                raise ExportError(f"this base ties its output head to the input embeddings: llama.cpp then runs the "
                                  f"head with {TOKEN_EMBEDDINGS} itself and applies the embedding LoRA on `{module}` "
                                  f"there too, as a linear LoRA of the wrong shape (it aborts; peft changes only the "
                                  f"input lookup); {merged}")
    unexpected = sorted(module for module in copies if gguf_names.get(module) not in (TOKEN_EMBEDDINGS, OUTPUT_HEAD))
    if unexpected:
        raise ExportError(f"the adapter carries the own weights of `{'`, `'.join(unexpected)}` (base_layer.weight), "
                          f"which a GGUF LoRA cannot hold; {merged}")
    base = _base_weights(run, [f"{module}.weight" for module in copies])
    for module, copy in sorted(copies.items()):
        own = base.get(f"{module}.weight")
        if own is None:
            raise ExportError(f"the adapter carries `{module}`'s own weights, and the base {run.model_cfg.name} has no "
                              f"`{module}.weight` to check them against; {merged}")
        if own.shape != copy.shape:
            raise ExportError(f"the adapter's copy of `{module}` has shape {tuple(copy.shape)} and the base "
                              f"{run.model_cfg.name}'s has {tuple(own.shape)}: the vocabulary was resized for "
                              f"training, and a GGUF LoRA cannot carry the new rows; {merged}")
        if not torch.equal(copy.to(torch.float32), own.to(torch.float32)):
            diff = float((copy.to(torch.float32) - own.to(torch.float32)).abs().max())
            raise ExportError(f"the adapter's copy of `{module}`'s weights differs from the base {run.model_cfg.name}'s "
                              f"(max |diff| {diff:.3g}): it was changed in training or saved from another base, and a "
                              f"GGUF LoRA carries only the low-rank update, not the layer itself; {merged}")


def write_lora_gguf(run: RunAdapter, path: Path, *, gguf_type: str, name: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    gguf = gguf_package()
    info = run.info
    if info.peft_type == "FULL_MODEL":
        raise ExportError(f"{run.run_dir} trained the model itself ({info.method}), so there is no adapter to write as a "
                          f"GGUF LoRA; `{command('export', str(run.run_dir), '--format', 'gguf')}` writes the whole "
                          "model")
    if info.is_prompt_learning:
        raise ExportError(f"{info.method} adds virtual tokens, which neither a GGUF LoRA nor a merge can carry; serve it "
                          f"with transformers + peft (`{command('export', str(run.run_dir), '--format', 'adapter')}`)")
    problems = []
    if not info.is_lora:
        problems.append(f"it is {info.peft_type}, not LoRA")
    if info.use_dora:
        problems.append("DoRA magnitude vectors have no GGUF LoRA form")
    if info.modules_to_save:
        problems.append(f"modules_to_save ({', '.join(info.modules_to_save)}) cannot be carried by a GGUF LoRA")
    if problems:
        advice = merged_gguf_advice(run)
        raise ExportError("this adapter cannot be written as a GGUF LoRA: " + "; ".join(problems) +
                          f". {advice[0].upper()}{advice[1:]}")
    config = run.base_config
    try:
        layout = check_architecture(config, with_rope=False)
    except ExportError as refused:
        raise ExportError(f"{_reason(refused)}. Serve the adapter with vLLM or transformers + peft "
                          f"(`{command('export', str(run.run_dir), '--format', 'adapter')}`), or merge it "
                          f"(`{command('export', str(run.run_dir), '--format', 'hf')}`) for llama.cpp's "
                          "convert_hf_to_gguf.py") from None
    qtype, ftype = gguf_types(gguf_type, ADAPTER_GGUF_TYPES, ADAPTER_TYPES_WHY)
    alpha = gguf_lora_alpha(run)
    tensors = load_file(str(info.path / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    embeddings: set[str] = set()  # modules with peft's embedding LoRA (lora_embedding_A / _B)
    copies: dict[str, torch.Tensor] = {}  # peft's copy of an adapted output head / embedding layer
    for key, value in tensors.items():
        match = _LORA_TENSOR.match(key) or _EMBEDDING_LORA_TENSOR.match(key)
        if match is not None:
            pairs.setdefault(match.group("module"), {})[match.group("ab")] = value.to(torch.float32)
            if match.re is _EMBEDDING_LORA_TENSOR:
                embeddings.add(match.group("module"))
        elif (layer_copy := _BASE_LAYER_COPY.match(key)) is not None:
            copies[layer_copy.group("module")] = value
        else:
            raise ExportError(f"unexpected adapter tensor `{key}`; GGUF LoRA export supports LoRA on linear layers "
                              "and the token embeddings")
    name_map = gguf.get_tensor_name_map(model_arch(layout), config.num_hidden_layers)
    gguf_names = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ExportError(f"the adapter has only lora_{''.join(ab)} for `{module}`; it is incomplete")
        gguf_names[module] = name_map.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if gguf_names[module] is None:  # e.g. Gemma 2's head: llama.cpp runs it with the token embeddings
            raise ExportError(f"llama.cpp's {layout.arch.lower()} layout has no tensor for `{module}`, so a GGUF LoRA "
                              f"cannot carry its update; {merged_gguf_advice(run)}")
    check_head_and_embedding_loras(run, gguf_names, embeddings, copies)

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[model_arch(layout)])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    add_model_parameters(writer, config, layout)
    writer.add_file_type(int(ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for module, ab in sorted(pairs.items()):
        base_name = gguf_names[module]
        if module in embeddings:  # peft: A (r, vocab), B (dim, r); llama.cpp looks up token rows of lora_a
            lora_a, lora_b = ab["A"].T.contiguous(), ab["B"]  # (vocab, r), (dim, r), as convert_lora_to_gguf.py
        else:
            lora_a = ab["A"]  # (r, in): same layout llama.cpp expects
            lora_b = permute_for(f"{module}.weight", ab["B"], config, layout)  # rows are output rows: permute like the weight
        for suffix, data in ((".lora_a", lora_a), (".lora_b", lora_b)):
            array, written = quantize_array(data.numpy(), qtype)
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
    layout = check_architecture(config, with_rope=False)
    name_map = gguf.get_tensor_name_map(model_arch(layout), config.num_hidden_layers)
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
        if stem == TOKEN_EMBEDDINGS:  # lora_a (vocab, r): rows llama.cpp looks up per token; lora_b (dim, r)
            deltas[hf_name] = (alpha / lora_b.shape[1]) * (lora_a @ lora_b.T)
            continue
        delta = unpermute_for(hf_name, (alpha / lora_b.shape[1]) * (lora_b @ lora_a), config, layout)
        deltas[hf_name] = delta.T if stored_transposed(hf_name, layout) else delta  # GPT-2's Conv1D: (in, out)
    return deltas


FLOAT_FILE_TYPES = {0: "f32", 1: "f16", 32: "bf16"}  # general.file_type: all F32, mostly F16, mostly BF16
PRECISION_ORDER = ("f32", "f16", "bf16", "q8_0")  # finer to coarser, as the tolerances in `verify`


def _run_on_base_gguf(source: Path | None, lora_file: Path, reference: verify.Reference, gguf_type: str) -> dict[str, Any]:
    """The LoRA file in llama.cpp on the GGUF the base was converted from, as the Modelfile's FROM runs it.

    The tolerance is the coarser of the base file's and the LoRA's precision (llama.cpp multiplies F16 / BF16
    weights with activations rounded to that type). On a quantized base llama.cpp also quantizes the activations,
    so the bound is loose and a miss is a warning (the base file's precision is not the export's doing); on a
    float base a miss fails the export.
    """
    if source is None or not source.is_file():
        where = "the base was not converted from one" if source is None else f"{source} no longer exists"
        return llama_cpp_check.not_run(f"there is no base GGUF to run it on ({where}); "
                                       "try it with llama-cli -m BASE.gguf --lora FILE")
    from peftkit.models.gguf_config import read_gguf_field

    base_type = FLOAT_FILE_TYPES.get(read_gguf_field(source, "general.file_type"))  # None: quantized, or not said
    quantized = base_type is None
    coarser = max(base_type or "f32", gguf_type, key=PRECISION_ORDER.index)
    result = llama_cpp_check.check(source, reference, precision=llama_cpp_check.QUANTIZED_BASE if quantized
                                   else f"llama.cpp-{coarser}", lora=lora_file)
    if result.get("passed") is False:
        if not quantized:
            verify.enforce({**result, "failures": [f"in llama.cpp on {source.name}: {f}" for f in result["failures"]]},
                           "GGUF LoRA file")
        log.warning("In llama.cpp on the quantized base %s, the LoRA answers further from the adapter than expected: %s",
                    source.name, "; ".join(result["failures"]))
    return result


@output_lock.releases_claims
def export_gguf_adapter(run_dir: str | Path, out: str | Path | None = None, *, gguf_type: str = "f16",
                        force: bool = False, check: bool = True, base: str | None = None) -> ExportResult:
    """`peftkit export RUN_DIR --format gguf-adapter`: the LoRA alone, for `llama-cli -m BASE.gguf --lora FILE`."""
    from peftkit.export.merge import _attach, _load_base, _reference, load_run_tokenizer

    run_dir = Path(run_dir).expanduser().resolve()
    target = prepare_output(Path(out) if out else run_dir / "gguf-adapter", force=force, protected=[run_dir])
    gguf_types(gguf_type, ADAPTER_GGUF_TYPES, ADAPTER_TYPES_WHY)
    run = resolve_run(run_dir, base)
    name = slug(run.recipe.name or run.run_dir.name)
    file_name = f"{name}-lora-{gguf_type}.gguf"
    tokenizer, source, system = load_run_tokenizer(run), source_gguf_of(run), run.recipe.data.system_prompt
    ollama_refusal = ollama_lora_refusal(getattr(run.base_config, "model_type", None), str(run.run_dir))
    report = None
    with disk_full_as_error(target), atomic_directory(target, replace=force) as tmp:
        assert tmp is not None
        facts = write_lora_gguf(run, tmp / file_name, gguf_type=gguf_type, name=name)
        if check:
            # Rebuild W + alpha/r * B @ A from the file (un-permuting Q/K) and compare with the adapter itself.
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
            report["llama_cpp"] = _run_on_base_gguf(source, tmp / file_name, reference, gguf_type)
            report = write_verification(tmp, target, report)
        # A GGUF LoRA carries no chat template or system prompt: without these lines Ollama would prompt it with
        # the base GGUF's template and default system prompt, not the ones it was trained with
        from_lines = [*([f"FROM {source}"] if source else  # Ollama reads `#` as a comment only at a line's start
                        ["# Replace the path below with the GGUF of the base this LoRA was trained on:",
                         "FROM /path/to/base-model.gguf"]),
                      f"ADAPTER ./{file_name}"]
        modelfile = ollama_modelfile(file_name, tokenizer, system, from_lines=from_lines)
        if ollama_refusal is not None:  # said first, so nobody runs `ollama create` on it unwarned
            modelfile = "".join(f"# {line}\n" for line in textwrap.wrap(ollama_refusal, 110, break_long_words=False,
                                                                               break_on_hyphens=False)) + modelfile
        atomic_write_text(tmp / "Modelfile", modelfile)
    notes = [f"alpha written: {facts['alpha']:.4g} over {facts['modules']} modules",
             *([llama_cpp_check.summary(report["llama_cpp"])] if report is not None else []),
             f"llama.cpp: llama-cli -m {shlex.quote(str(source)) if source else 'BASE.gguf'} --lora {shlex.quote(str(target / file_name))}"
             + (f" --system-prompt {shlex.quote(system)}: a GGUF LoRA carries no system prompt or chat template, so send the "
                "one it was trained with (the Modelfile has it for Ollama)" if system else "")]
    if source is not None:
        notes.append(f"the Modelfile's FROM is the GGUF the base was converted from ({source.name}): the weights "
                     "this adapter was trained on" + (", before the extra 4-bit quantization of QLoRA"
                                                      if run.quantization is not None else ""))
    if ollama_refusal is not None:
        notes.append(ollama_refusal + " (the Modelfile says so at its top)")
    if run.quantization is not None:
        note = (f"this QLoRA adapter learnt the {run.quantization.bits}-bit base's rounding too, but a GGUF LoRA is "
                "applied to whatever base GGUF llama.cpp loads, and was verified against the adapter on the float "
                f"base: it answers as `{command('eval', str(run.run_dir), '--qlora-base', 'original')}` measures. "
                "`--format gguf` (merged into the dequantized weights) keeps what was trained")
        log.warning("%s", note)
        notes.append(note)
    return ExportResult(target, f"gguf-adapter-{gguf_type}", list_files(target), report, None, notes)
