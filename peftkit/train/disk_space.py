"""Before training: can output_dir's disk hold what the run will write?

A full disk at the first checkpoint, an epoch into the run, loses that epoch; the sizes are known before the first
step (trainable parameters, optimizer, checkpoint count), so a run that cannot fit is refused before it starts.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from peftkit.errors import RunDirError
from peftkit.train import checkpoints
from peftkit.utils.atomic import free_space
from peftkit.utils.sizes import readable_size

log = logging.getLogger(__name__)

SMALL_FILES_BYTES = 1 << 20
"""A checkpoint's other files: trainer state, RNG and scheduler states, config, model card."""
_OPTIMIZER_STATE_BYTES = {"adamw_8bit": 2, "paged_adamw_8bit": 2, "lion_8bit": 1, "adafactor": 0, "sgd": 0,
                          "paged_adamw_32bit": 8}
"""Bytes per optimized parameter of the optimizers whose states do not follow the parameter's dtype (torch's AdamW
keeps two states in it)."""
_DEEPSPEED_STATE_BYTES = 12
"""ZeRO checkpoints hold fp32 master weights and two fp32 Adam states per trainable parameter."""
_HEADER_BYTES = 160
"""Per saved tensor: its safetensors header entry (name, dtype, shape, offsets)."""
_STATE_RECORD_BYTES = 850
"""Per optimized tensor: its optimizer states' pickle records (what counts for adapters of small models)."""


@dataclass(frozen=True)
class RunWrites:
    """What a run writes to output_dir, in bytes."""

    checkpoint: int
    """One checkpoint: the saved weights, the optimizer states and the small files."""
    weights: int
    """The final adapter (or model) the run leaves."""
    checkpoints_at_once: int
    """The most checkpoints on disk at one time: save_total_limit, plus the new one written before the oldest goes
    (and early stopping's best one)."""

    @property
    def at_least(self) -> int:
        """What the run certainly needs: one checkpoint (when it saves any) and its final weights."""
        return self.weights + (self.checkpoint if self.checkpoints_at_once else 0)

    @property
    def at_most(self) -> int:
        return self.weights + self.checkpoint * self.checkpoints_at_once


def _bytes(tensors: Any) -> int:
    return sum(getattr(t, "ds_numel", t.numel()) * t.element_size() for t in tensors)


def _optimized(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer gets states for by the end: with gradual unfreezing, the blocks unfrozen later
    too (only the first stage's are trainable when training starts)."""
    from peftkit.adapters.partial import freeze_plan

    plan = freeze_plan(model)
    if plan is not None:
        return [p for g in plan.groups if g.unfreeze_stage is not None for _, p in g.params]
    return [p for p in model.parameters() if p.requires_grad]


def _adapter_save(model: torch.nn.Module) -> list[torch.Tensor] | None:
    """The tensors peft writes for the adapter (a LoRA on the embeddings also saves the embedding matrix; prefix
    tuning with a projection saves the projected prefix, not the MLP), or None for a model that is not a peft model
    or whose weights are partitioned (ZeRO-3)."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from peft.utils.other import EMBEDDING_LAYER_NAMES

    if not isinstance(model, PeftModel) or any(hasattr(p, "ds_numel") for p in model.parameters()):
        return None
    config = model.peft_config[model.active_adapter]
    targets = getattr(config, "target_modules", None) or ()
    embeddings = any(name in targets for name in EMBEDDING_LAYER_NAMES)  # peft's "auto", without its Hub lookup
    with torch.no_grad():
        return list(get_peft_model_state_dict(model, save_embedding_layers=embeddings).values())


def checkpoint_bytes(model: torch.nn.Module, *, method: str, optimizer: str, deepspeed: bool) -> tuple[int, int]:
    """(one checkpoint, the final weights). Full and partial fine-tuning save every weight, adapters what peft
    saves (prefix tuning with a projection also keeps its encoder in checkpoints)."""
    params = list(model.parameters())
    optimized = _optimized(model)
    saved = (params if method in ("full", "partial") else _adapter_save(model)) or optimized
    weights = _bytes(saved) + len(saved) * _HEADER_BYTES
    count = sum(getattr(p, "ds_numel", p.numel()) for p in optimized)
    if deepspeed:  # its model-states file holds the saved weights once more
        states = count * _DEEPSPEED_STATE_BYTES + weights
    elif optimizer in _OPTIMIZER_STATE_BYTES:
        states = count * _OPTIMIZER_STATE_BYTES[optimizer]
    else:
        states = 2 * _bytes(optimized)
    if method == "prefix_tuning" and saved is not optimized:  # checkpoints keep the prefix encoder itself too
        states += _bytes(optimized)
    return weights + states + len(optimized) * _STATE_RECORD_BYTES + SMALL_FILES_BYTES, weights


def saves_in_run(*, rows: int, batch_size: int, grad_accum: int, world_size: int, epochs: float, max_steps: int | None,
                 save_steps: int | None) -> int:
    """How many checkpoints training saves: every `save_steps` optimizer steps and at the last step, else at the end
    of every epoch (a cut one too)."""
    steps_per_epoch = max(1, math.ceil(math.ceil(rows / (batch_size * world_size)) / grad_accum))
    total = max_steps or math.ceil(epochs * steps_per_epoch)
    return math.ceil(total / (save_steps or steps_per_epoch))


def run_writes(model: torch.nn.Module, recipe: Any, *, rows: int, world_size: int, save_steps: int | None,
               deepspeed: bool, keeps_best: bool = False, existing_checkpoints: int = 0) -> RunWrites:
    """`save_steps`: the interval training uses (early stopping moves it onto eval_steps), None for epoch-wise saves.
    `keeps_best`: early stopping keeps the best checkpoint besides the last ones. `existing_checkpoints`: complete
    ones already on disk (a resumed run), counted by the free space already."""
    cfg = recipe.train
    checkpoint, weights = checkpoint_bytes(model, method=recipe.adapter.method, optimizer=cfg.optimizer,
                                           deepspeed=deepspeed)
    saves = saves_in_run(rows=rows, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, world_size=world_size,
                         epochs=cfg.epochs, max_steps=cfg.max_steps, save_steps=save_steps)
    at_once = min(cfg.save_total_limit + 1 + keeps_best, saves)
    if existing_checkpoints:  # resumed: the saved ones are on disk; a new one is written before the oldest goes
        at_once = max(min(1, saves), at_once - existing_checkpoints)
    return RunWrites(checkpoint=checkpoint, weights=weights, checkpoints_at_once=at_once)


def _tree_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        except OSError:
            continue
    return total


def tokenizer_bytes(tokenizer: Any) -> int:
    """About what saving the tokenizer writes beside the final weights (a fast tokenizer's tokenizer.json: Gemma's
    is 33 MB); checkpoints do not keep one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return len(backend.to_str(pretty=True).encode())
    files = [Path(f) for f in (getattr(tokenizer, "vocab_file", None), getattr(tokenizer, "merges_file", None)) if f]
    return sum(f.stat().st_size for f in files if f.is_file())


def check_free_space(run_dir: Path, writes: RunWrites, *, save_total_limit: int, freed: int = 0) -> None:
    """Refuse a run whose first checkpoint and final weights cannot fit; warn when its later checkpoints may not.
    `freed`: what an earlier run that this one replaces (--force) gives back. Measured where checkpoints go (a
    `checkpoints` folder linked to another disk counts there)."""
    measured = free_space(run_dir / "checkpoints")
    if measured is None:
        return
    free = measured[1] + freed
    each = (f"{writes.checkpoints_at_once} checkpoint{'s' if writes.checkpoints_at_once != 1 else ''} of "
            f"{readable_size(writes.checkpoint)} (weights and optimizer states; train.save_total_limit is {save_total_limit}) "
            f"and the final weights ({readable_size(writes.weights)})")
    if free < writes.at_least:
        raise RunDirError(
            f"not enough free space for this run in {run_dir}: {readable_size(free)} free"
            f"{' (with what the earlier run there gives back)' if freed else ''}, and it writes at least "
            f"{readable_size(writes.at_least)} ({readable_size(writes.checkpoint)} a checkpoint and {readable_size(writes.weights)} of final "
            "weights); free some space there, or set output_dir to a disk with more room"
        )
    if free < writes.at_most:
        log.warning("%s has %s free, and this run may write %s at once: %s. A later save may find the disk full "
                    "(the run then stops and can be resumed once space is freed); lower train.save_total_limit or "
                    "free some space to avoid it", run_dir, readable_size(free), readable_size(writes.at_most), each)


def check_whole_model_fits(run_dir: Path, model: torch.nn.Module, recipe: Any, tokenizer: Any, *,
                           replacing: bool) -> None:
    """Full and partial fine-tuning save the whole model in each checkpoint and at the end: checked as soon as the
    model is loaded, before `--force` removes an earlier run (whose space it then counts as free). A floor: a
    partial run's optimizer states are counted later, once its blocks are chosen."""
    method = recipe.adapter.method
    if method not in ("full", "partial"):
        return
    weights = _bytes(model.parameters()) + tokenizer_bytes(tokenizer)
    checkpoint = (checkpoint_bytes(model, method=method, optimizer=recipe.train.optimizer, deepspeed=False)[0]
                  if method == "full" else weights)
    check_free_space(run_dir, RunWrites(checkpoint=checkpoint, weights=weights, checkpoints_at_once=1),
                     save_total_limit=recipe.train.save_total_limit, freed=_tree_bytes(run_dir) if replacing else 0)


def check_before_training(run_dir: Path, model: torch.nn.Module, recipe: Any, tokenizer: Any, args: Any, *, rows: int,
                          world_size: int, resume: bool) -> None:
    """`args`: the run's TrainingArguments (their save interval, early stopping, their DeepSpeed config)."""
    existing = sum(map(checkpoints.is_complete, checkpoints.checkpoint_dirs(run_dir))) if resume else 0
    writes = run_writes(model, recipe, rows=rows, world_size=world_size, deepspeed=bool(getattr(args, "deepspeed", None)),
                        save_steps=args.save_steps if args.save_strategy == "steps" else None,
                        keeps_best=bool(args.load_best_model_at_end), existing_checkpoints=existing)
    writes = replace(writes, weights=writes.weights + tokenizer_bytes(tokenizer))
    check_free_space(run_dir, writes, save_total_limit=recipe.train.save_total_limit)
