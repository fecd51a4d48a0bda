"""DeepSpeed ZeRO: recipe -> DeepSpeed config, checks that run before any weights load, the build cache.

peftkit does not drive DeepSpeed itself; transformers' Trainer does (`TrainingArguments(deepspeed=...)`).
This module decides what config the Trainer gets (the train section's values, `"auto"` where the
Trainer fills them in at launch), rejects combinations that cannot work, and keeps DeepSpeed's
JIT-compiled CPU ops from hanging a run: a build killed half-way leaves a `lock` file that every
later build waits on forever, so we look for such locks first and say what to delete.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib.util
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from peftkit.config.schema import DeepSpeedConfig, Recipe
from peftkit.errors import ConfigError, PeftkitError

log = logging.getLogger(__name__)

CONFIG_FILE = "deepspeed.json"
EXTRA = "deepspeed.extra"
LOCK_MINUTES_ENV = "PEFTKIT_EXTENSION_LOCK_MINUTES"
DEFAULT_LOCK_MINUTES = 5.0
QUIET_STEPS = 1_000_000_000
"""`steps_per_print`: DeepSpeed's own periodic step log would duplicate the Trainer's."""


class ExtensionLockError(PeftkitError, RuntimeError):
    """A JIT build lock was left behind by a killed build; waiting on it would hang forever."""


# --------------------------------------------------------------------------------------------------
# Config generation


def enabled(recipe: Recipe) -> bool:
    return recipe.deepspeed is not None


def read_json_config(path: str | Path) -> dict[str, Any]:
    """A user's raw DeepSpeed JSON, with one clear error when it is missing or malformed."""
    path = Path(path).expanduser()
    if not path.is_file():
        from peftkit.config.load import unset_variable_message

        unset = unset_variable_message(str(path))
        raise ConfigError(f"deepspeed: the DeepSpeed config file {path} does not exist ({unset or 'check the path'})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"deepspeed: {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def zero_stage(recipe: Recipe) -> int | None:
    """The ZeRO stage a recipe asks for; None without DeepSpeed (or with an unreadable JSON)."""
    if recipe.deepspeed is None:
        return None
    if isinstance(recipe.deepspeed, DeepSpeedConfig):
        return recipe.deepspeed.stage
    try:
        return int(read_json_config(recipe.deepspeed).get("zero_optimization", {}).get("stage", 0))
    except (ConfigError, TypeError, ValueError, AttributeError):
        return None


def precision_flags(device: str, dtype: torch.dtype) -> tuple[bool, bool]:
    """(bf16, fp16) exactly as `run.training_arguments` sets them: mixed precision only off-CPU."""
    return dtype == torch.bfloat16 and device != "cpu", dtype == torch.float16 and device != "cpu"


def _offload(target: str, nvme_path: str | None, device: str) -> dict[str, Any]:
    block: dict[str, Any] = {"device": target, "pin_memory": device == "cuda"}
    if target == "nvme":
        block["nvme_path"] = nvme_path
    return block


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def generate_config(cfg: DeepSpeedConfig, recipe: Recipe, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """The DeepSpeed JSON for a `deepspeed:` block.

    Values the recipe fixes are written out (so `deepspeed.json` documents the run, and the Trainer
    checks they match its arguments); `"auto"` is left where only the launch knows the value
    (global batch = world size x micro batch x accumulation, bucket sizes from the model's hidden size).
    No `optimizer` block: the Trainer's torch AdamW is used, so DeepSpeed JIT-builds no fused Adam."""
    train = recipe.train
    bf16, fp16 = precision_flags(device, dtype)
    zero: dict[str, Any] = {"stage": cfg.stage}
    if cfg.stage >= 1:
        zero["contiguous_gradients"] = cfg.contiguous_gradients
        zero["reduce_bucket_size"] = cfg.reduce_bucket_size
    if cfg.overlap_comm is not None:
        zero["overlap_comm"] = cfg.overlap_comm
    if cfg.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(cfg.offload_optimizer, cfg.nvme_path, device)
    if cfg.offload_params != "none":
        zero["offload_param"] = _offload(cfg.offload_params, cfg.nvme_path, device)
    if cfg.stage == 3:
        if not cfg.gather_weights_on_save:
            log.warning(NO_GATHER_ON_SAVE.format(key="deepspeed.gather_weights_on_save"))
        zero["stage3_gather_16bit_weights_on_model_save"] = cfg.gather_weights_on_save
        zero["stage3_prefetch_bucket_size"] = "auto"
        zero["stage3_param_persistence_threshold"] = "auto"
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": "auto",
        "gradient_clipping": train.max_grad_norm,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": fp16},
        "zero_optimization": zero,
        # The Trainer's torch AdamW (no fused_adam JIT build); also with offload (no cpu_adam build).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": QUIET_STEPS,
        "wall_clock_breakdown": False,
    }
    return deep_merge(config, cfg.extra)


NO_GATHER_ON_SAVE = ("deepspeed: {key} is false, so intermediate checkpoints hold no usable adapter (the final "
                     "adapter is still gathered and saved)")
"""The warning for ZeRO-3 without gathering on save, in a JSON config or a `deepspeed:` block."""


TRAIN_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping")
"""Top-level DeepSpeed keys the Trainer fills from the train section, but only where the JSON says "auto"."""


def complete_json_config(config: dict[str, Any], device: str) -> dict[str, Any]:
    """Fill in what peftkit relies on in a user's JSON; explicit user values win.

    A key the JSON leaves out is not the Trainer's value but DeepSpeed's own default: no gradient clipping, no
    micro batch (an error once the model has loaded), fp32. So absent train settings become "auto" (the recipe's)."""
    config = copy.deepcopy(config)
    for key in TRAIN_KEYS:
        config.setdefault(key, "auto")
    for key in ("bf16", "fp16"):
        if key == "bf16" and "bfloat16" in config:  # DeepSpeed's older name: a `bf16` block would override it
            continue
        block = config.setdefault(key, {})
        if isinstance(block, dict):
            block.setdefault("enabled", "auto")
    zero = config.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3:
        if zero.get("stage3_gather_16bit_weights_on_model_save") is False:
            log.warning(NO_GATHER_ON_SAVE.format(key="stage3_gather_16bit_weights_on_model_save"))
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    optimizer = config.get("optimizer")
    if optimizer is None:  # the Trainer's torch AdamW, with offload too (accelerate would swap in cpu_adam: a JIT build)
        config.setdefault("zero_allow_untested_optimizer", True)
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    elif device == "cpu" and str(optimizer.get("type", "")).lower() in {"adam", "adamw"}:
        params = optimizer.setdefault("params", {})
        if "torch_adam" not in params:
            log.info("deepspeed: using torch's Adam on CPU (torch_adam: true) instead of JIT-building fused_adam")
            params["torch_adam"] = True
    return config


def build_config(recipe: Recipe, device: str, dtype: torch.dtype) -> dict[str, Any] | None:
    """The DeepSpeed config dict for this run, or None without DeepSpeed."""
    if recipe.deepspeed is None:
        return None
    if isinstance(recipe.deepspeed, str):
        return complete_json_config(read_json_config(recipe.deepspeed), device)
    return generate_config(recipe.deepspeed, recipe, device, dtype)


def training_kwargs(recipe: Recipe, device: str, dtype: torch.dtype, world_size: int | None = None) -> dict[str, Any]:
    """Extra `TrainingArguments` for DeepSpeed / multi-process runs: the config and the comm backend
    (gloo between CPU processes, nccl between GPUs)."""
    from peftkit.train.launch import dist_info

    world_size = dist_info().world_size if world_size is None else world_size
    kwargs: dict[str, Any] = {}
    config = build_config(recipe, device, dtype)
    if config is not None:
        kwargs["deepspeed"] = config
    if config is not None or world_size > 1:
        kwargs["ddp_backend"] = "gloo" if device == "cpu" else "nccl" if device == "cuda" else None
    return kwargs


def quant_storage_dtype(recipe: Recipe, dtype: torch.dtype) -> torch.dtype | None:
    """ZeRO-3 partitions the packed 4-bit weights together with the other parameters, so they must be stored in
    the dtype DeepSpeed gives every parameter (`bnb_4bit_quant_storage`, as PEFT's QLoRA + ZeRO-3 guide sets it):
    the training `dtype`, not the one the weights load in. An fp16 run with modules_to_save loads float32 weights,
    and DeepSpeed's fp16 engine casts every float32 parameter to fp16, packed bytes included (the first forward
    then failed on a weight of half its size)."""
    from peftkit.adapters import effective_quantization

    quantization = effective_quantization(recipe)
    if quantization is None or quantization.bits != 4 or zero_stage(recipe) != 3:
        return None
    return dtype


# --------------------------------------------------------------------------------------------------
# Validation (before any weights load)


def _own_optimizer(recipe: Recipe) -> str | None:
    """The setting that makes peftkit hand the Trainer its own optimizer (adapters' `trainer_extras`), if any."""
    if recipe.adapter.method == "partial":
        return "adapter.method: partial (unfreezing schedule, layer-wise learning rates)"
    if getattr(recipe.adapter, "loraplus_lr_ratio", None) is not None:
        return "adapter.loraplus_lr_ratio (LoRA+)"
    return None


def _fix(where: str, in_json: str) -> str:
    """What to do about a contradicting value: in `extra` it has no business (peftkit writes it), in a JSON file it may."""
    return "remove it from deepspeed.extra (peftkit writes the right value)" if where == EXTRA else in_json


def _train_problems(recipe: Recipe, raw: dict[str, Any], where: str, device: str | None) -> list[str]:
    """Values of a user's DeepSpeed JSON (or `deepspeed.extra`) that contradict the train section: transformers rejects
    them at launch, after the model has loaded, with a traceback from every rank."""
    problems = []
    train = recipe.train
    for key, field, expected in (
        ("train_micro_batch_size_per_gpu", "batch_size", train.batch_size),
        ("gradient_accumulation_steps", "grad_accum", train.grad_accum),
        ("gradient_clipping", "max_grad_norm", train.max_grad_norm),
        ("optimizer.params.lr", "lr", train.lr),
        ("optimizer.params.weight_decay", "weight_decay", train.weight_decay),
    ):
        value = _nested(raw, key)
        if value not in (None, "auto") and value != expected:
            problems.append(f"{where} sets {key}={value} but train.{field} is {expected}: "
                            + _fix(where, 'make them equal, or set it to "auto"'))
    problems.extend(_global_batch_problems(recipe, raw, where, None))
    if device is not None:
        from peftkit.models import resolve_dtype

        bf16, fp16 = precision_flags(device, resolve_dtype(recipe.train.dtype, device))
        for key, wanted in (("bf16", bf16), ("fp16", fp16)):
            block = raw.get(key, raw.get("bfloat16") if key == "bf16" else None)  # DeepSpeed reads both names
            value = block.get("enabled") if isinstance(block, dict) else None
            if value not in (None, "auto") and bool(value) != wanted:
                state = "enables" if value else "disables"
                problems.append(
                    f"{where} {state} {key} but this run {'uses' if wanted else 'does not use'} {key} on {device} "
                    f"(train.dtype: {recipe.train.dtype}); " + _fix(where, f'set {key}.enabled to "auto"')
                )
    return problems


def _nested(raw: dict[str, Any], dotted: str) -> Any:
    """`optimizer.params.lr` of a DeepSpeed config, or None where any level is missing."""
    for part in dotted.split("."):
        raw = raw.get(part) if isinstance(raw, dict) else None
    return raw


def _global_batch_problems(recipe: Recipe, raw: dict[str, Any], where: str, world_size: int | None) -> list[str]:
    """`train_batch_size` is processes x batch size x accumulation. The number of processes is known at launch only
    (world_size None: `validate`, which can still tell a value that fits no number of processes)."""
    value = raw.get("train_batch_size")
    if value in (None, "auto"):
        return []
    batch, accum = recipe.train.batch_size, recipe.train.grad_accum
    if world_size is not None:
        if value == batch * accum * world_size:
            return []
        return [f"{where} sets train_batch_size={value} but this run trains {world_size} process(es) x train.batch_size "
                f"{batch} x train.grad_accum {accum} = {batch * accum * world_size} examples per step: "
                + _fix(where, 'set it to "auto"')]
    if isinstance(value, int) and not isinstance(value, bool) and value > 0 and value % (batch * accum) == 0:
        return []
    return [f"{where} sets train_batch_size={value}, which is not a multiple of train.batch_size {batch} x "
            f"train.grad_accum {accum} (it must be that times the number of processes): " + _fix(where, 'set it to "auto"')]


_SECTIONS = ("zero_optimization", "bf16", "fp16", "optimizer", "scheduler", "gradient_clipping", "train_batch_size",
             "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "activation_checkpointing",
             "steps_per_print", "wall_clock_breakdown", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
             "communication_data_type", "prescale_gradients", "gradient_predivide_factor", "amp", "tensorboard",
             "flops_profiler", "aio", "checkpoint", "data_types", "torch_autocast")
"""DeepSpeed's common top-level settings: a key close to one of them is a misspelling, which DeepSpeed ignores."""
_PRECISION_KEYS = ("enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
                   "consecutive_hysteresis", "min_loss_scale", "immediate_grad_update", "fp16_master_weights_and_grads",
                   "bf16_master_weights_and_grads", "bf16_optimizer_states", "check_grad_overflow")


def _misspelt(keys: Any, known: Any, where: str, section: str = "") -> list[str]:
    problems = []
    for key in keys if isinstance(keys, dict) else ():
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.8) if key not in known else None
        if close:
            problems.append(f"{where}: `{section}{key}` is no DeepSpeed setting (DeepSpeed would ignore it); did you "
                            f"mean `{section}{close[0]}`?")
    return problems


def _zero_keys() -> set[str]:
    """The keys DeepSpeed's ZeRO config takes (their aliases too); empty without DeepSpeed."""
    if importlib.util.find_spec("deepspeed") is None:
        return set()
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fields = DeepSpeedZeroConfig.model_fields
    return set(fields) | {field.alias for field in fields.values() if field.alias}


def _key_problems(raw: dict[str, Any], where: str) -> list[str]:
    """Misspelt keys, found before the model loads: top-level and precision ones DeepSpeed would silently ignore
    (`zero_optimisation` runs ZeRO stage 0), and ZeRO's, which it refuses only once the model is loaded."""
    problems = _misspelt(raw, _SECTIONS, where)
    for block in ("bf16", "fp16"):
        problems += _misspelt(raw.get(block), _PRECISION_KEYS, where, f"{block}.")
    zero = raw.get("zero_optimization")
    if isinstance(zero, dict) and (known := _zero_keys()):
        for key in (k for k in zero if k not in known):
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
            problems.append(f"{where}: `zero_optimization.{key}` is no ZeRO setting of DeepSpeed"
                            + (f"; did you mean `{close[0]}`?" if close else ""))
    return problems


def _zero_problems(raw: dict[str, Any], where: str) -> list[str]:
    problems = []
    zero = raw.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        return [f"{where}: zero_optimization must be an object"]
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    for key in ("offload_optimizer", "offload_param"):
        block = zero.get(key) or {}
        if isinstance(block, dict) and block.get("device") == "nvme" and not block.get("nvme_path"):
            problems.append(f"{where}: zero_optimization.{key} offloads to nvme but sets no nvme_path")
    if isinstance(zero.get("offload_param"), dict) and zero["offload_param"].get("device", "none") != "none" and stage != 3:
        problems.append(f"{where}: offload_param needs ZeRO stage 3 (only stage 3 partitions parameters)")
    return problems


def _block_problems(cfg: DeepSpeedConfig) -> list[str]:
    problems = []
    extra_zero = cfg.extra.get("zero_optimization")
    extra_stage = extra_zero.get("stage") if isinstance(extra_zero, dict) else None
    if extra_stage is not None and extra_stage != cfg.stage:
        # DeepSpeed would run the extra's stage while peftkit's stage-3 handling (gathering on save, 4-bit storage,
        # the 8-bit refusal) follows deepspeed.stage.
        problems.append(f"deepspeed.extra sets zero_optimization.stage={extra_stage} but deepspeed.stage is {cfg.stage}: "
                        f"set the stage with deepspeed.stage only, and remove it from deepspeed.extra")
    if cfg.offload_params != "none" and cfg.stage != 3:
        problems.append(
            f"deepspeed.offload_params: {cfg.offload_params} needs stage 3 (only ZeRO-3 partitions parameters); "
            f"set deepspeed.stage: 3, or offload_params: none"
        )
    if cfg.offload_optimizer != "none" and cfg.stage == 0:
        problems.append("deepspeed.offload_optimizer needs stage 1, 2 or 3 (stage 0 does not partition optimizer states)")
    problems.extend(_settings_the_stage_ignores(cfg))
    uses_nvme = "nvme" in (cfg.offload_optimizer, cfg.offload_params)
    if uses_nvme and not cfg.nvme_path:
        problems.append("deepspeed: nvme offload needs deepspeed.nvme_path (a directory on a local NVMe drive, on every node)")
    elif uses_nvme and cfg.nvme_path and not Path(cfg.nvme_path).expanduser().is_dir():
        problems.append(f"deepspeed.nvme_path {cfg.nvme_path} is not a directory; create it (on every node) or fix the path")
    return problems


def _settings_the_stage_ignores(cfg: DeepSpeedConfig) -> list[str]:
    """Block settings changed from their defaults that generate_config leaves out at this stage: refused like the
    offload settings, instead of dropped without a word. Compared with the defaults, not the keys written, so a run's
    own recipe.yaml (every key written) loads."""
    problems = []
    if cfg.stage == 0:
        changed = cfg.changed_from_defaults(("contiguous_gradients", "reduce_bucket_size"))
        if changed:
            them = "it" if len(changed) == 1 else "them"
            problems.append(f"deepspeed.{' and deepspeed.'.join(changed)} {'tunes' if len(changed) == 1 else 'tune'} "
                            f"ZeRO's gradient reduction (stages 1 to 3); stage 0 is plain data parallelism and would "
                            f"ignore {them}: remove {them}, or set deepspeed.stage: 1, 2 or 3")
    if cfg.stage != 3 and cfg.changed_from_defaults(("gather_weights_on_save",)):
        problems.append(f"deepspeed.gather_weights_on_save: false applies to stage 3 only (stage {cfg.stage} keeps whole "
                        "weights in every process, so there is nothing to gather): remove it, or set deepspeed.stage: 3")
    return problems


def _raw_config(recipe: Recipe) -> tuple[dict[str, Any], str]:
    """The user's own DeepSpeed keys (the JSON file, or the block's `extra`) and how messages name them."""
    if isinstance(recipe.deepspeed, str):
        return read_json_config(recipe.deepspeed), f"deepspeed: {recipe.deepspeed}"
    assert recipe.deepspeed is not None
    return recipe.deepspeed.extra, EXTRA


def world_size_problems(recipe: Recipe, world_size: int) -> list[str]:
    """`train_batch_size` against the number of processes, once the launch knows it."""
    if recipe.deepspeed is None:
        return []
    try:
        raw, where = _raw_config(recipe)
    except ConfigError:
        return []  # check_deepspeed reports it
    return _global_batch_problems(recipe, raw, where, world_size)


def check_deepspeed(recipe: Recipe, device: str | None = None) -> list[str]:
    """Every problem with the recipe's `deepspeed:` setting (empty when fine or absent). A JSON file and the block's
    `extra` keys get the same checks.

    device: the device the run will use (default: resolved from train.device); raw precision is checked against it.
    The number of processes is not known here: `world_size_problems` checks train_batch_size against it at launch."""
    if recipe.deepspeed is None:
        return []
    if device is None:
        from peftkit.models import resolve_device

        try:
            device = resolve_device(recipe.train.device)
        except PeftkitError:
            device = None  # reported by the device checks; the precision check needs a device
    problems = []
    if importlib.util.find_spec("deepspeed") is None:
        problems.append("deepspeed: DeepSpeed is not installed: `pip install deepspeed` (or remove the `deepspeed:` block)")
    if recipe.task != "causal_lm":
        problems.append(f"deepspeed: only causal_lm recipes run under DeepSpeed so far (this one is {recipe.task}); "
                        "remove the `deepspeed:` block")
    try:
        raw, where = _raw_config(recipe)
    except ConfigError as exc:
        return [*problems, *exc.problems]
    problems.extend(_key_problems(raw, where))
    if isinstance(recipe.deepspeed, str):
        problems.extend(_zero_problems(raw, where))
    else:
        problems.extend(_block_problems(recipe.deepspeed))
        # The block's own settings are checked above; here what `extra` adds (its offload settings at the block's stage).
        problems.extend(_zero_problems(deep_merge({"zero_optimization": {"stage": recipe.deepspeed.stage}}, raw), where))
    problems.extend(_train_problems(recipe, raw, where, device))
    own = _own_optimizer(recipe)
    if recipe.train.optimizer != "auto" and "optimizer" in raw:
        problems.append(f"train.optimizer is {recipe.train.optimizer} but the DeepSpeed config defines an `optimizer` "
                        "too: keep one of them")
    elif own and "optimizer" in raw:
        problems.append(f"deepspeed: the config defines an `optimizer` but {own} needs peftkit's own optimizer "
                        "(its parameter groups): remove the DeepSpeed `optimizer` block")
    if (not own and "optimizer" in raw and getattr(recipe.adapter, "use_dora", False)
            and recipe.train.weight_decay > 0):  # its optimizer takes every parameter in one group
        problems.append("deepspeed: the config defines an `optimizer`, which applies train.weight_decay to every "
                        "parameter, DoRA's magnitude vectors too (they hold the base weights' norms, and decay shrinks "
                        "them towards 0): remove the DeepSpeed `optimizer` block (the Trainer's AdamW runs under "
                        "DeepSpeed and leaves them out), or set train.weight_decay: 0")
    if own and "scheduler" in raw:  # DeepSpeed's schedulers set one learning rate for every parameter group
        problems.append(f"deepspeed: the config defines a `scheduler`, which gives every parameter group the same "
                        f"learning rate, but {own} sets one per group: remove the DeepSpeed `scheduler` block "
                        "(train.scheduler and train.warmup_ratio choose the schedule)")
    elif "scheduler" in raw:  # transformers then hands the schedule to DeepSpeed and drops the recipe's
        problems.append(f"deepspeed: the config defines a `scheduler` ({_scheduler_type(raw)}), which would replace "
                        f"train.scheduler ({recipe.train.scheduler}) and train.warmup_ratio, while the run's recipe, "
                        "summary and model card name the recipe's: remove the DeepSpeed `scheduler` block and choose "
                        "the schedule with train.scheduler and train.warmup_ratio")
    zero = raw.get("zero_optimization")
    offload = (zero.get("offload_optimizer") if isinstance(zero, dict) else None) or {}
    offloads_optimizer = (offload.get("device", "none") != "none" if isinstance(offload, dict) else False) or (
        not isinstance(recipe.deepspeed, str) and recipe.deepspeed.offload_optimizer != "none")
    if offloads_optimizer and ("8bit" in recipe.train.optimizer or "paged" in recipe.train.optimizer):
        problems.append(f"train.optimizer {recipe.train.optimizer} is a bitsandbytes GPU optimizer, but the DeepSpeed "
                        "config offloads the optimizer to CPU / NVMe, where it cannot run: use train.optimizer: auto "
                        "(AdamW), or deepspeed.offload_optimizer: none")
    if getattr(recipe.adapter, "unfreeze_schedule", None) is not None:
        problems.append("adapter.unfreeze_schedule (gradual unfreezing) cannot run under DeepSpeed: ZeRO partitions the "
                        "trainable parameters once, at the start, so blocks unfrozen later would never train; drop the "
                        "schedule (train_last_layers trains a fixed set) or the `deepspeed:` block")
    from peftkit.adapters import effective_quantization

    quantization = effective_quantization(recipe)
    if quantization is not None and quantization.bits == 8 and zero_stage(recipe) == 3:
        problems.append(
            "deepspeed stage 3 with 8-bit quantization is not supported: ZeRO-3 + bitsandbytes is set up (quant_storage) "
            "for 4-bit only; use quantization.bits: 4, or deepspeed stage 2"
        )
    return problems


def _scheduler_type(raw: dict[str, Any]) -> str:
    block = raw.get("scheduler")
    return str(block.get("type", "no type")) if isinstance(block, dict) else type(block).__name__


# --------------------------------------------------------------------------------------------------
# Process environment and the JIT build cache


def extensions_dir() -> Path:
    """Where DeepSpeed's JIT-built ops go: $TORCH_EXTENSIONS_DIR, else a per-user peftkit folder keyed by
    Python and torch build (ops built for another torch would not load) and by environment: an op's build
    file names the environment's include paths, so two virtual environments sharing one folder would each
    rebuild it (minutes, without peftkit's message) whenever the other had built it last."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    import hashlib

    from peftkit.models import peftkit_home

    accel = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    env = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:8]
    return peftkit_home() / "torch_extensions" / f"{py}-torch{torch.__version__.split('+')[0]}-{accel}-env{env}"


def lock_holders(lock: Path) -> list[int] | None:
    """PIDs that have `lock` open. torch's build lock is an O_EXCL file whose descriptor the builder keeps
    open until the build ends, so on Linux /proc tells a live build from a dead one. None: unknowable here."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target = os.path.realpath(lock)
    holders = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    holders.append(int(entry.name))
                    break
            except OSError:
                continue
    return holders


def _newest_mtime(folder: Path, skip: Path) -> float:
    times = [p.stat().st_mtime for p in folder.iterdir() if p != skip and p.exists()]
    return max(times, default=0.0)


def lock_minutes() -> float:
    try:
        return float(os.environ.get(LOCK_MINUTES_ENV, DEFAULT_LOCK_MINUTES))
    except ValueError:
        return DEFAULT_LOCK_MINUTES


def stale_locks(root: Path | None = None, max_age_minutes: float | None = None) -> list[tuple[Path, float]]:
    """(lock, age in seconds) for every build lock older than N minutes that no live builder holds.

    Without /proc (not Linux) a lock counts as stale only if nothing in its build folder changed for N minutes."""
    root = extensions_dir() if root is None else Path(root)
    max_age = 60.0 * (lock_minutes() if max_age_minutes is None else max_age_minutes)
    if not root.is_dir():
        return []
    now = time.time()
    found = []
    for lock in sorted([*root.glob("*/lock"), *root.glob("lock")]):
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        if age < max_age:
            continue
        holders = lock_holders(lock)
        if holders:
            continue
        if holders is None and now - _newest_mtime(lock.parent, lock) < max_age:
            continue
        found.append((lock, age))
    return found


def stale_lock_message(lock: Path, age: float) -> str:
    return (
        f"DeepSpeed's build lock {lock} is {age / 60:.0f} min old and no live process holds it: an earlier op build "
        f"was killed half-way, and every later run would wait on it forever. Delete it (`rm {lock}`), or delete the "
        f"folder {lock.parent} to rebuild that op from scratch, then run again."
    )


def check_extension_locks(root: Path | None = None, max_age_minutes: float | None = None) -> None:
    """Raise instead of hanging when a killed build left its lock behind."""
    stale = stale_locks(root, max_age_minutes)
    if stale:
        raise ExtensionLockError("\n".join(stale_lock_message(lock, age) for lock, age in stale))


def wait_for_extension_locks(root: Path | None = None, max_age_minutes: float | None = None, poll_s: float = 2.0) -> None:
    """Wait while another process builds an op; give up with a clear error once a lock turns stale.

    torch's own wait (FileBaton.wait) has no time limit, so a dead builder's lock hangs it silently."""
    root = extensions_dir() if root is None else Path(root)
    told = False
    while True:
        check_extension_locks(root, max_age_minutes)
        locks = [lock for lock in [*root.glob("*/lock"), *root.glob("lock")] if lock.exists()] if root.is_dir() else []
        if not locks:
            return
        if not told:
            log.info("Waiting for another process to finish building %s (gives up %s min after the lock was taken "
                     "if no live process holds it)", ", ".join(str(p.parent.name) for p in locks),
                     f"{lock_minutes() if max_age_minutes is None else max_age_minutes:g}")
            told = True
        time.sleep(poll_s)


def _shm_op_built(root: Path) -> bool:
    return any(root.glob("deepspeed_shm_comm*/*.so"))


def ensure_cpu_ops_built(root: Path | None = None) -> None:
    """Build DeepSpeed's CPU communication op (`deepspeed_shm_comm`, built at its first init_distributed)
    up front, with a message, our own lock checks and a clear error if it cannot be compiled."""
    root = extensions_dir() if root is None else Path(root)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(root))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    wait_for_extension_locks(root)
    if _shm_op_built(root):
        return
    log.info("Building DeepSpeed's CPU communication op once (about 1.5 min; cached in %s)", root)
    started = time.perf_counter()
    from deepspeed.accelerator import get_accelerator
    import deepspeed.ops

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return  # DeepSpeed will not use the op on this machine, so there is nothing to build
    try:
        builder.load(verbose=False)
    except Exception as exc:  # compiler errors surface as RuntimeError / CalledProcessError
        raise PeftkitError(
            f"DeepSpeed could not build its CPU op {builder.NAME} in {root}: {exc}. It needs a C++ compiler "
            "(g++) and Python headers; install them, or run without `deepspeed:` on CPU."
        ) from None
    log.info("Built %s in %.0f s", builder.NAME, time.perf_counter() - started)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def process_state_released() -> Iterator[None]:
    """A DeepSpeed run inside a Python caller's process (`train()` in a notebook or sweep, no launcher) leaves
    process-wide state behind: transformers' global ZeRO config, which makes every later `from_pretrained` load
    ZeRO-3-partitioned (empty) weights, accelerate's DeepSpeed state (and its ACCELERATE_USE_DEEPSPEED, which made
    the next run without DeepSpeed evaluate through it) and the environment of its one-process world (RANK, ...).
    Put back as the caller had them, however the run ends. The world itself stays: DeepSpeed keeps its groups, and
    a next DeepSpeed run in this process goes on in it."""
    environ = dict(os.environ)
    try:
        yield
    finally:
        from accelerate.state import AcceleratorState
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        AcceleratorState._reset_state(reset_partial_state=True)  # noqa: SLF001 - accelerate's own reset (its tests')
        if os.environ != environ:
            os.environ.clear()
            os.environ.update(environ)


def prepare_process(device: str) -> None:
    """Environment DeepSpeed needs in this process: the CPU accelerator, the build cache (checked for stale
    locks, CPU op built), and a one-process "world" when no launcher started us."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ and "LOCAL_RANK" not in os.environ:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
        )
    if device == "cpu" and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        ensure_cpu_ops_built()
    else:
        wait_for_extension_locks()


def uses_nvme(config: dict[str, Any]) -> bool:
    zero = config.get("zero_optimization") or {}
    return any((zero.get(key) or {}).get("device") == "nvme" for key in ("offload_optimizer", "offload_param"))


def async_io_available() -> bool:
    """NVMe offload runs on DeepSpeed's async_io op, which needs libaio (headers) to build."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("AsyncIOBuilder")
    return builder is not None and bool(builder.is_compatible(verbose=False))


class _AccumulationWarning(logging.Filter):
    """accelerate's "GradientAccumulationPlugin has 1, DeepSpeed config has N" at every DeepSpeed start with
    train.grad_accum > 1. The Trainer accumulates itself and gives accelerate 1 step; accelerate then takes DeepSpeed's
    value, which it does not divide the loss by under DeepSpeed (nor does DeepSpeed: the Trainer passes
    scale_wrt_gas=False). Nothing is wrong (the losses match a run without DeepSpeed), so the warning is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "GradientAccumulationPlugin has 1, DeepSpeed config has" not in str(record.msg)


def _quiet_accumulation_warning() -> None:
    logger = logging.getLogger("accelerate.accelerator")
    if not any(isinstance(f, _AccumulationWarning) for f in logger.filters):
        logger.addFilter(_AccumulationWarning())


def setup(recipe: Recipe, device: str, dtype: torch.dtype) -> dict[str, Any] | None:
    """Prepare this process for DeepSpeed and return its config (`write_config` puts it in the run directory);
    None without DeepSpeed."""
    config = build_config(recipe, device, dtype)
    if config is None:
        return None
    cfg = recipe.deepspeed
    if device == "cpu" and isinstance(cfg, DeepSpeedConfig) and "cpu" in (cfg.offload_optimizer, cfg.offload_params):
        log.warning("deepspeed: offloading to CPU memory saves nothing on a CPU-only run (it is the same memory)")
    prepare_process(device)
    from peftkit.train.launch import dist_info

    problems = world_size_problems(recipe, dist_info().world_size)  # before the model loads, not in every rank's traceback
    if problems:
        raise ConfigError(problems)
    _quiet_accumulation_warning()
    if uses_nvme(config) and not async_io_available():
        raise PeftkitError(
            "deepspeed: nvme offload needs DeepSpeed's async_io op, which cannot be built here: install libaio "
            "(`apt install libaio-dev`, then `ds_report` shows async_io as compatible), or offload to cpu"
        )
    log.info("DeepSpeed ZeRO stage %s", config.get("zero_optimization", {}).get("stage", 0))
    return config


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    """RUN_DIR/deepspeed.json: the config the run trained with (rank 0 writes it)."""
    from peftkit.utils.atomic import atomic_write_text

    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# Evaluation and saving around the engine


@contextlib.contextmanager
def gathered_for_save(trainer: Any, method: str) -> Iterator[None]:
    """Under ZeRO-3 every parameter is partitioned: each rank holds a slice, and saving the model as it is
    writes empty tensors (the upstream bugs trl#4416, peft#2892, peft#2450). All ranks gather what will be
    saved while rank 0 writes it: the trainable weights of an adapter, every weight (frozen ones too) of a
    method that saves the whole model (`full`, `partial`)."""
    engine = getattr(trainer, "deepspeed", None)
    if engine is None or not engine.zero_optimization_partition_weights():
        yield
        return
    import deepspeed

    from peftkit.adapters.registry import get_method

    model = trainer.model
    whole = not get_method(method).uses_peft
    params = list(model.parameters()) if whole else [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
