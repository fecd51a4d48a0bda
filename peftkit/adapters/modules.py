"""Where things are in a transformers model: linear layers, the block stack, head and embeddings.

Shared by the method modules and by validation, which runs them on a meta-device skeleton
(names and shapes only), so nothing here may touch parameter values.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

HEAD_NAMES = ("lm_head", "score", "classifier")
"""Output heads: causal LM projection, Llama-style classifier, BERT-style classifier."""


def linear_module_names(model: torch.nn.Module) -> dict[str, str]:
    """Full name -> class name of every linear-like leaf module (what LoRA can target)."""
    names = {}
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, torch.nn.Linear) or kind in {"Linear4bit", "Linear8bitLt", "Conv1D"}:
            names[name] = kind
    return names


def head_module_names(model: torch.nn.Module) -> set[str]:
    """Names of the output head(s): the output embeddings, or a `score` / `classifier` module."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {n for n, m in model.named_modules() if head is not None and m is head}
    names |= {n for n, _ in model.named_modules() if n.split(".")[-1] in HEAD_NAMES}
    return names


def all_linear_targets(model: torch.nn.Module) -> set[str]:
    """What peft's `all-linear` selects: every linear layer except the output head (`selected_linear` keeps only
    a vision-language model's text decoder of it)."""
    heads = head_module_names(model)
    return {n for n in linear_module_names(model) if n not in heads and not any(n.startswith(h + ".") for h in heads)}


def text_decoder(model: torch.nn.Module, linear: set[str] | None = None) -> str | None:
    """The text decoder's module name in a model that has other towers (Gemma 3 4B+, Llama 4, Qwen2-VL, ...), None
    for a plain language model. Text-only chat training never runs those towers: adapters there would only add
    untrained weights, which serving engines (vLLM) refuse for the vision encoder. `linear`: `all_linear_targets`
    of the model, if the caller has it already."""
    get_decoder = getattr(model, "get_decoder", None)
    try:
        decoder = get_decoder() if callable(get_decoder) else None
    except (AttributeError, NotImplementedError, ValueError):
        return None
    name = next((n for n, m in model.named_modules() if m is decoder), None) if decoder is not None else None
    if not name:
        return None
    inside = name + "."
    linear = all_linear_targets(model) if linear is None else linear
    return name if any(not n.startswith(inside) for n in linear) else None


def in_text_decoder(name: str, decoder: str | None) -> bool:
    return decoder is None or name.startswith(decoder + ".")


def matches_target(name: str, target: str | list[str] | None, linear_names: set[str]) -> bool:
    """Mirror of peft's matching (exact name or `.suffix`; a string is a full-match regex)."""
    if target is None:
        return False
    if target == "all-linear":
        return name in linear_names
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in target)


def selected_linear(model: torch.nn.Module, target: str | list[str] | None) -> dict[str, str]:
    """Full name -> class name of the linear-like modules `target` selects (as peft matches them), in the text
    decoder only where the model has other towers (`text_decoder`)."""
    linear = all_linear_targets(model)
    decoder = text_decoder(model, linear)
    return {name: kind for name, kind in linear_module_names(model).items()
            if matches_target(name, target, linear) and in_text_decoder(name, decoder)}


def target_problems(option: str, target: str | list[str] | None, model: torch.nn.Module,
                    hint: str = "") -> tuple[list[str], list[str]]:
    """(linear modules `target` selects, problems): it selects none, or a listed name selects nothing.

    peft only refuses a target list when *no* entry matches, so `[k_proj, v_proj, down_proj]` on a
    model with a fused `qkv_proj` would quietly adapt `down_proj` alone."""
    matched = list(selected_linear(model, target))
    suffixes = ", ".join(sorted({n.split(".")[-1] for n in all_linear_targets(model)}))
    if not matched:
        if isinstance(target, str) and target != "all-linear":
            # a bare `q_proj` is a regex that must match the *full* name, so it selects nothing (as in peft)
            example = target if re.fullmatch(r"[\w.]+", target) else ", ".join(suffixes.split(", ")[:2])
            hint = (f"{hint}; a string is a regular expression matched against the full module name "
                    f"(e.g. {next(iter(sorted(all_linear_targets(model))), 'model.layers.0.mlp')!r}): "
                    f"for module names write a list, e.g. [{example}]")
        return matched, [f"{option} {target!r} matches no linear module in this model; its linear modules are: {suffixes}{hint}"]
    if isinstance(target, (list, tuple)):
        modules = [n for n, _ in model.named_modules()]
        missing = [t for t in target if not any(n == t or n.endswith(f".{t}") for n in modules)]
        if missing:
            return matched, [f"{option}: {', '.join(map(repr, missing))} names no module of this model; its linear "
                             f"modules are: {suffixes}. Remove or rename the entry"]
    return matched, []


def lora_module_types() -> tuple[type, ...]:
    """The layer types peft's LoRA can wrap (peft 0.21 `dispatch_default`; bitsandbytes' layers are Linear)."""
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
            torch.nn.MultiheadAttention, Conv1D)


def saved_module(name: str, modules_to_save: Sequence[str]) -> bool:
    """Whether `name` is, or sits inside, a module peft trains fully for `modules_to_save`: peft takes every module
    whose full name ends with an entry (a plain suffix, `head` also picks `lm_head`)."""
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(prefix.endswith(entry) for entry in modules_to_save for prefix in prefixes)


def peft_targets(model: torch.nn.Module, target: str | list[str] | None,
                 exclude: list[str] | None = None) -> dict[str, torch.nn.Module]:
    """Every module peft would wrap for `target`: a regex or a suffix also selects containers (a decoder block,
    the rotary embedding) that it then refuses. `exclude`: modules_to_save, which peft never targets."""
    linear = all_linear_targets(model)
    found = {}
    for name, module in model.named_modules():
        if not name or saved_module(name, exclude or []):
            continue
        if matches_target(name, target, linear):
            found[name] = module
    return found


def rank_limit(module: torch.nn.Module) -> int | None:
    """The largest useful LoRA rank for a layer: its smaller dimension (a rank-r update of an m x n weight)."""
    if isinstance(module, torch.nn.Embedding):
        return min(module.num_embeddings, module.embedding_dim)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):  # also 4/8-bit layers (packed weights)
        return min(module.in_features, module.out_features)
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 2:  # Conv1D (in, out); ConvNd (out, in, *kernel)
        return min(weight.shape[0], weight[0].numel()) if weight.dim() > 2 else min(weight.shape)
    return None


_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


def layer_index(name: str) -> int | None:
    """The block index in a module name (`model.layers.3.mlp.up_proj` -> 3), as peft finds it."""
    match = _LAYER_INDEX.match(name)
    return int(match.group("idx")) if match else None


@dataclass(frozen=True)
class BlockLayout:
    """The model cut into: embeddings (below the blocks), blocks, top (norm/pooler), head."""

    blocks_name: str
    """Module path of the block list (`model.layers`, `bert.encoder.layer`)."""
    blocks: tuple[torch.nn.Module, ...]
    embeddings: tuple[tuple[str, torch.nn.Parameter], ...]
    top: tuple[tuple[str, torch.nn.Parameter], ...]
    """Parameters after the blocks that are not the head (final norm, BERT pooler)."""
    head: tuple[tuple[str, torch.nn.Parameter], ...]
    tied_head: bool
    """The head's weight is the input embedding matrix (training one trains the other)."""

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The repeated transformer blocks: the largest ModuleList of same-class modules."""
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        from peftkit.errors import PeftkitError

        raise PeftkitError(f"cannot find the transformer blocks of {type(model).__name__} (no ModuleList of layers)")
    return best


# Modules that run after the block stack although some models register them before it (OPT's decoder registers
# `final_layer_norm` and `project_out` ahead of `layers`).
_AFTER_BLOCKS = re.compile(r"(^|\.)(final[^.]*|ln_f|norm_f|project_out)\.")


def block_layout(model: torch.nn.Module) -> BlockLayout:
    """Split parameters by position relative to the block stack (registration order of named_parameters, except
    the output-side modules named in `_AFTER_BLOCKS`)."""
    blocks_name, blocks = find_blocks(model)
    block_params = {id(p) for p in blocks.parameters()}
    heads = head_module_names(model)
    head_ids = {id(p) for h in heads for p in model.get_submodule(h).parameters()}
    embeddings, top, head = [], [], []
    seen_blocks = False
    for name, param in model.named_parameters():
        if id(param) in head_ids:
            head.append((name, param))
        elif id(param) in block_params:
            seen_blocks = True
        elif seen_blocks or _AFTER_BLOCKS.search(name):
            top.append((name, param))
        else:
            embeddings.append((name, param))
    # A tied head is registered once, under the embeddings' name: it is found by identity above.
    input_embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = input_embeddings is not None and any(id(p) in head_ids for p in input_embeddings.parameters())
    return BlockLayout(blocks_name, tuple(blocks), tuple(embeddings), tuple(top), tuple(head), tied)
