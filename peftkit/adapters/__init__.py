"""Adapter methods, registered by name. Each turns the recipe's `adapter:` block into peft calls.

One module per method (lora, qlora, prefix, prompt, ia3, full, partial) registers itself in
`registry.REGISTRY`; everything below dispatches on `cfg.method`, so callers never branch on
the method themselves.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from peftkit.adapters import full, ia3, lora, partial, prefix, prompt, qlora  # noqa: F401 - registers the methods
from peftkit.adapters.modules import all_linear_targets, linear_module_names
from peftkit.adapters.registry import REGISTRY, TrainerExtras, get_method
from peftkit.config.schema import ADAPTER_CLASSES, QLoraAdapterConfig, QuantizationConfig, Recipe
from peftkit.errors import ConfigError

log = logging.getLogger(__name__)

METHODS = tuple(m for m in (c.model_fields["method"].default for c in ADAPTER_CLASSES) if m in REGISTRY)
"""Method names in schema order (lora, qlora, prefix_tuning, prompt_tuning, ia3, full, partial)."""

__all__ = [
    "METHODS",
    "all_linear_targets",
    "base_model_view",
    "build_adapter",
    "check_recipe_adapter",
    "check_targets",
    "effective_quantization",
    "linear_module_names",
    "parameter_counts",
    "prepare_for_generation",
    "save_trained",
    "trainer_extras",
    "uses_peft",
]


def effective_quantization(recipe: Recipe) -> QuantizationConfig | None:
    """The quantization a recipe implies: its own block, or nf4 for `qlora` without one."""
    if recipe.quantization is not None:
        return recipe.quantization
    if isinstance(recipe.adapter, QLoraAdapterConfig):
        return qlora.DEFAULT_QUANTIZATION
    return None


def check_recipe_adapter(recipe: Recipe) -> list[str]:
    """Method/task/quantization combinations that cannot work (no model needed)."""
    method = get_method(recipe.adapter.method)
    task = getattr(recipe, "task", "causal_lm")
    problems = []
    if task not in method.tasks:
        problems.append(
            f"adapter.method: {method.name} does not support task: {task} in peftkit "
            f"(use one of: {', '.join(n for n, m in REGISTRY.items() if task in m.tasks)})"
        )
    quantization = effective_quantization(recipe)
    if quantization is not None and not method.quantization:
        problems.append(
            f"quantization: a 4/8-bit base is only supported with lora/qlora, not `{method.name}`; "
            "remove the `quantization:` block (or use method: qlora)"
        )
    from peftkit.models.load import planned_device

    if dora_over_int8_on_cpu(getattr(recipe.adapter, "use_dora", False), quantization, planned_device(recipe.train.device)):
        problems.append(DORA_INT8_ON_CPU)
    init = getattr(recipe.adapter, "init", None)
    if init is not None:
        problems.extend(lora.init_problems(init, quantization is not None, getattr(recipe.adapter, "use_dora", False)))
    if getattr(recipe.adapter, "prefix_projection", False) and recipe.train.early_stopping_patience and recipe.deepspeed:
        problems.append(PREFIX_PROJECTION_CHECKPOINTS + ", so early stopping cannot load its best checkpoint: remove "
                        "train.early_stopping_patience, or adapter.prefix_projection")
    return problems


DORA_INT8_ON_CPU = (
    "adapter.use_dora over an 8-bit base cannot train on the CPU: peft's DoRA re-reads the int8 weight on every "
    "forward pass and on the CPU that drops its scales (bitsandbytes then fails on the next step); use a 4-bit base "
    "(quantization.bits: 4, the qlora default), 8-bit LoRA without use_dora, or a CUDA GPU")
"""peft 0.21's `dequantize_module_weight` moves a CPU Int8Params back with `.to(cpu)`, which rebuilds it
without the SCB that `Linear8bitLt.init_8bit_state` had moved into the layer's state: the next forward starts
from SCB None. On a GPU that branch is not taken."""


def dora_over_int8_on_cpu(use_dora: bool, quantization: Any, device: str) -> bool:
    """The combination DORA_INT8_ON_CPU refuses: for a recipe to train (validation) and a trained run to load."""
    return bool(use_dora) and quantization is not None and quantization.bits == 8 and device == "cpu"


PREFIX_PROJECTION_CHECKPOINTS = (
    "adapter.prefix_projection under DeepSpeed: peft saves a projected prefix in the form used for inference, not the "
    "MLP being trained, and peftkit's own copy of the trained encoder is not written into DeepSpeed checkpoints")
"""Why DeepSpeed checkpoints of a prefix-projection run cannot be trained from (early stopping's best, --resume);
without DeepSpeed each checkpoint carries the trained encoder (train/trainer.py PREFIX_ENCODER_FILE)."""


def check_targets(model: torch.nn.Module, cfg: Any, task: str = "causal_lm") -> list[str]:
    """Problems with the adapter block against the real module tree (a meta-device copy is enough)."""
    return get_method(cfg.method).check(model, cfg, task)


def build_adapter(
    model: Any,
    cfg: Any,
    *,
    task: str = "causal_lm",
    quantized: bool = False,
    calibration: Sequence[dict[str, list[int]]] | None = None,
) -> Any:
    """The model ready to train: peft-wrapped with only adapter weights trainable, or (full/partial) frozen as planned.

    `calibration`: tokenized training rows, used by data-driven inits (LoRA `init: eva`).
    """
    method = get_method(cfg.method)
    if quantized and not method.quantization:
        raise ConfigError(f"adapter.method: {method.name} cannot train over a quantized base; use lora or qlora")
    return method.build(model, cfg, task=task, quantized=quantized, calibration=calibration)


def keep_trained_weights_in_float32(model: torch.nn.Module, dtype: torch.dtype, device: str, *, deepspeed: bool) -> int:
    """bf16 mixed precision on a GPU: the weights full / partial fine-tuning trains (including blocks a schedule
    unfreezes later) are kept in float32, as fp16 runs load them. In bf16, AdamW's steps of about lr are below the
    resolution of most weights: at lr 1e-5 one step changed 15 % of them. The forward still runs in bf16 (the
    Trainer's autocast, which also wraps the model's generate); the final save is in `dtype` again (full.save_model),
    checkpoints keep float32 for an exact resume. DeepSpeed keeps float32 master weights of its own; on a CPU (no
    autocast) a bf16 recipe trains in bf16 as written. peft models are left alone: their adapter weights are float32
    already, and a float32 `modules_to_save` copy among bf16 layers fails in peft's generate, which runs the inner
    model outside the autocast. Returns the number of parameters cast."""
    if dtype != torch.bfloat16 or device == "cpu" or deepspeed or uses_peft(model):
        return 0
    plan = partial.freeze_plan(model)
    trained = ([p for g in plan.groups if g.unfreeze_stage is not None for _, p in g.params] if plan is not None
               else [p for p in model.parameters() if p.requires_grad])
    cast = 0
    for param in {id(p): p for p in trained}.values():
        if param.dtype == torch.bfloat16:
            param.data = param.data.float()
            cast += param.numel()
    if cast:
        setattr(model, full.SAVE_DTYPE_ATTR, dtype)
        log.info("Training %s weights in float32 under bf16 mixed precision (kept precise enough for small updates)",
                 f"{cast:,}")
    return cast


def uses_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


@contextlib.contextmanager
def base_model_view(model: Any) -> Iterator[Any]:
    """The model without its adapter, for "before" scores. Full/partial models are still the base
    before training starts, so they are used as they are (call this before training only); so are
    freshly built PiSSA / OLoRA / CorDA adapters, which moved part of each weight out of the base:
    switched off they would leave the residual, while untrained they make up the base exactly."""
    if uses_peft(model) and not lora.rewrote_base(model):
        with model.disable_adapter():
            yield model
    else:
        yield model


def trainer_extras(model: Any, cfg: Any, args: Any) -> TrainerExtras:
    """Callbacks and optimizer a method needs in the Trainer (partial: unfreezing, layer-wise LR; LoRA+)."""
    method = get_method(cfg.method)
    if method.trainer_extras is None:
        return TrainerExtras()
    return method.trainer_extras(model, cfg, args)


def save_trained(model: Any, run_dir: Path, method: str | None = None) -> Path:
    """Write the trained weights: RUN_DIR/adapter (peft layout) or RUN_DIR/model (full/partial)."""
    from peftkit.utils.atomic import atomic_directory

    name = method or ("lora" if uses_peft(model) else "full")
    spec = get_method(name)
    target = run_dir / ("adapter" if spec.uses_peft else full.MODEL_DIR)
    with atomic_directory(target, replace=True) as tmp:
        assert tmp is not None
        if spec.save is not None:
            spec.save(model, Path(tmp))
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)
    return target


def prepare_for_generation(model: Any) -> Any:
    """Per-method fixes to `model.generate`: prefix tuning with use_cache=False, prompt tuning with left padding."""
    return prompt.generation_fix(prefix.generation_fix(model))


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total), counting 4-bit packed weights at their logical size."""
    trainable = total = 0
    for param in model.parameters():
        count = getattr(param, "ds_numel", param.numel())  # ZeRO-3 leaves empty placeholders
        if type(param).__name__ == "Params4bit":
            count *= 2
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total
