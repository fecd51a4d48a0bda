"""Partial fine-tuning: freeze the model except its top blocks and/or head (a freeze plan, no peft).

- `train_last_layers: K` trains the top K transformer blocks (plus what sits above them: the
  final norm, BERT's pooler); `train_head` / `train_embeddings` add the output head and the
  input embeddings (tied in SmolLM2: training either trains the shared matrix).
- `unfreeze_schedule` (gradual unfreezing, ULMFiT): start with `start_layers` top blocks and
  unfreeze one more block from the top every N steps or epochs, up to K. Every parameter that
  will ever train is in the optimizer from the start; frozen ones have no gradient, which
  torch optimizers skip (no update, no weight decay, no moment state) until they are unfrozen.
- `layerwise_lr_decay: d`: the head (and final norm/pooler) learn at lr, block i of L at
  lr * d^(L - i) (top block lr*d), embeddings at lr * d^(L + 1): ELECTRA/BEiT convention.

The optimizer is the Trainer's own choice (`Trainer.get_optimizer_cls_and_kwargs`), built over
these parameter groups and handed to the Trainer (`SFTTrainer(method_optimizer=)`, kept under DeepSpeed too).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftkit.adapters.full import save_model
from peftkit.adapters.modules import block_layout
from peftkit.adapters.registry import AdapterMethod, TrainerExtras, decayed_parameter_names, register, trainer_optimizer_class
from peftkit.config.schema import PartialAdapterConfig
from peftkit.errors import ConfigError
from peftkit.utils.once import say_once

log = logging.getLogger(__name__)

PLAN_ATTR = "peftkit_freeze_plan"


@dataclass
class ParamGroup:
    name: str
    """`head`, `top`, `block.<i>` or `embeddings`."""
    params: list[tuple[str, torch.nn.Parameter]]
    depth: int
    """Distance below the head: 0 for head/top, L - i for block i, L + 1 for embeddings."""
    unfreeze_stage: int | None
    """Schedule stage from which the group trains; None: never (stays frozen, not in the optimizer)."""


@dataclass
class FreezePlan:
    num_blocks: int
    groups: list[ParamGroup]
    start_blocks: int
    final_blocks: int
    tied_head: bool
    stage: int = -1
    history: list[tuple[int, int]] = field(default_factory=list)
    """(global step, trainable parameter count) at every change."""

    def trainable_groups(self, stage: int) -> list[ParamGroup]:
        return [g for g in self.groups if g.unfreeze_stage is not None and g.unfreeze_stage <= stage]

    def unfrozen_blocks(self, stage: int) -> int:
        return min(self.final_blocks, self.start_blocks + max(stage, 0))

    def apply(self, stage: int) -> bool:
        """Set requires_grad for `stage`; returns True when something changed."""
        if stage == self.stage:
            return False
        live = {id(p) for g in self.trainable_groups(stage) for _, p in g.params}
        for group in self.groups:
            for _, param in group.params:
                param.requires_grad_(id(param) in live)
        changed = self.stage != -1 and self.unfrozen_blocks(stage) != self.unfrozen_blocks(self.stage)
        self.stage = stage
        return changed

    def trainable_count(self) -> int:
        seen: dict[int, int] = {}
        for group in self.groups:
            for _, param in group.params:
                if param.requires_grad:  # ZeRO-3 leaves a partitioned parameter empty; ds_numel is its full size
                    seen[id(param)] = getattr(param, "ds_numel", param.numel())
        return sum(seen.values())


def make_plan(model: torch.nn.Module, cfg: PartialAdapterConfig) -> FreezePlan:
    layout = block_layout(model)
    n = layout.num_blocks
    k = cfg.train_last_layers
    start = cfg.unfreeze_schedule.start_layers if cfg.unfreeze_schedule else k
    groups: list[ParamGroup] = []
    if layout.head:
        # A head tied to the input embeddings is one matrix: it trains at the head's rate when train_head is on, and
        # at the embeddings' (the lowest layer-wise rate) when only train_embeddings is.
        groups.append(ParamGroup("head", list(layout.head), 0, 0 if cfg.train_head else None))
    if layout.top:
        # The final norm / pooler sit above the blocks: they train once any block does.
        stage = None if k == 0 else max(0, 1 - start)
        groups.append(ParamGroup("top", list(layout.top), 0, stage))
    blocks = dict(block_named_params(model, layout.blocks_name, n))
    for offset in range(n):
        index = n - 1 - offset  # offset 0 is the top block
        stage = None if offset >= k else max(0, offset + 1 - start)
        groups.append(ParamGroup(f"block.{index}", blocks[index], n - index, stage))
    tied_as_embeddings = layout.tied_head and cfg.train_embeddings and not cfg.train_head
    embeddings = [*layout.embeddings, *(layout.head if tied_as_embeddings else ())]
    if embeddings:
        groups.append(ParamGroup("embeddings", embeddings, n + 1, 0 if cfg.train_embeddings else None))
    return FreezePlan(n, groups, start, k, layout.tied_head)


def block_named_params(model: torch.nn.Module, blocks_name: str, n: int) -> list[tuple[int, list[tuple[str, torch.nn.Parameter]]]]:
    blocks = model.get_submodule(blocks_name)
    return [(i, [(f"{blocks_name}.{i}.{name}", p) for name, p in blocks[i].named_parameters()]) for i in range(n)]


def check(model: torch.nn.Module, cfg: PartialAdapterConfig, task: str = "causal_lm") -> list[str]:
    try:
        layout = block_layout(model)
    except Exception as exc:  # noqa: BLE001 - reported as a recipe problem, not a crash
        return [f"adapter.method: partial: {exc}"]
    problems = []
    if cfg.train_last_layers > layout.num_blocks:
        problems.append(
            f"adapter.train_last_layers {cfg.train_last_layers} is out of range: this model has {layout.num_blocks} blocks "
            f"(use 0..{layout.num_blocks})"
        )
    if cfg.unfreeze_schedule is not None and cfg.train_last_layers == 0:
        problems.append("adapter.unfreeze_schedule unfreezes the top blocks one by one up to train_last_layers, which "
                        "is 0: there is nothing to unfreeze; set train_last_layers or drop the schedule")
    if cfg.train_head and not layout.head:
        problems.append("adapter.train_head: this model has no output head (lm_head / score / classifier)")
    if task == "sequence_classification" and not cfg.train_head:
        problems.append("adapter.train_head must be true for sequence_classification: the classification head is new")
    return problems


def build(model: Any, cfg: PartialAdapterConfig, *, task: str = "causal_lm", quantized: bool = False, calibration: Any = None) -> Any:
    if quantized:
        raise ConfigError("adapter.method: partial cannot train a 4/8-bit quantized base; remove the `quantization:` block")
    problems = check(model, cfg, task)
    if problems:
        raise ConfigError(problems)
    plan = make_plan(model, cfg)
    for param in model.parameters():
        param.requires_grad_(False)
    plan.apply(0)
    if plan.tied_head and (cfg.train_head != cfg.train_embeddings):
        log.info("The head shares its weight with the input embeddings: training one trains both")
    setattr(model, PLAN_ATTR, plan)
    return model


def freeze_plan(model: Any) -> FreezePlan | None:
    return getattr(model, PLAN_ATTR, None)


def param_groups(plan: FreezePlan, lr: float, weight_decay: float, decay_names: set[str], decay: float) -> list[dict[str, Any]]:
    """Optimizer groups over every parameter that ever trains, LR scaled by depth."""
    groups, seen = [], set()
    for group in plan.groups:
        if group.unfreeze_stage is None:
            continue
        scale = decay**group.depth
        for with_decay in (True, False):
            params = []
            for name, param in group.params:
                if id(param) in seen or (name in decay_names) != with_decay:
                    continue
                seen.add(id(param))
                params.append(param)
            if params:
                groups.append(
                    {"params": params, "lr": lr * scale, "weight_decay": weight_decay if with_decay else 0.0, "peftkit_group": group.name}
                )
    return groups


def build_optimizer(model: Any, plan: FreezePlan, cfg: PartialAdapterConfig, args: Any) -> torch.optim.Optimizer:
    """The Trainer's optimizer class and settings over the plan's parameter groups."""
    decay_names = decayed_parameter_names(model)
    groups = param_groups(plan, args.learning_rate, args.weight_decay, decay_names, cfg.layerwise_lr_decay or 1.0)
    optimizer_cls, kwargs = trainer_optimizer_class(args, model)
    return optimizer_cls(groups, lr=args.learning_rate, **kwargs)


def _stage(schedule: Any, state: Any) -> int:
    if schedule is None:
        return 0
    if schedule.every_steps:
        return state.global_step // schedule.every_steps
    return math.floor((state.epoch or 0.0) + 1e-6) // schedule.every_epochs


def unfinished_schedule_advice(start_blocks: int, final_blocks: int, schedule: Any, max_steps: int,
                               epochs: float) -> str | None:
    """A sentence when a schedule's last stage starts after the run's last step, leaving top blocks of
    train_last_layers untrained without a word (quickstart-partial's every 20 steps over 120 steps stopped at 7 of
    8); else None. `max_steps` counts for `every_steps`, `epochs` for `every_epochs`."""
    if schedule is None:
        return None
    if schedule.every_steps:
        if not max_steps:
            return None
        last_stage, unit, length = (max_steps - 1) // schedule.every_steps, "steps", max_steps
    else:
        length = math.ceil(epochs or 1)
        last_stage, unit = (length - 1) // schedule.every_epochs, "epochs"
    reached = min(final_blocks, start_blocks + last_stage)
    if reached >= final_blocks:
        return None
    every = (length - 1) // (final_blocks - start_blocks)
    fix = (f"unfreeze more often (every_{unit}: {every} or less) or train longer" if every >= 1 else
           f"even a block every {unit[:-1]} cannot get there: start with more blocks (start_layers: "
           f"{final_blocks - (length - 1)} or more), train longer, or lower train_last_layers")
    return (f"adapter.unfreeze_schedule reaches {reached} of the {final_blocks} blocks of train_last_layers within "
            f"the run's {length} {unit}: the last {final_blocks - reached} never train; {fix}")


def _warn_if_unfinished(plan: FreezePlan, schedule: Any, state: Any) -> None:
    if not state.max_steps:
        return
    advice = unfinished_schedule_advice(plan.start_blocks, plan.final_blocks, schedule, state.max_steps,
                                        state.num_train_epochs)
    if advice:  # validate said it already where the recipe alone gives the run's length
        say_once(log, logging.WARNING, advice)


def unfreeze_callback(plan: FreezePlan, cfg: PartialAdapterConfig) -> Any:
    from transformers import TrainerCallback

    class GradualUnfreeze(TrainerCallback):
        """Sets the stage before every step; adds trainable counts to every log record."""

        def _update(self, state: Any) -> None:
            stage = _stage(cfg.unfreeze_schedule, state)
            if plan.apply(stage) or not plan.history:
                plan.history.append((state.global_step, plan.trainable_count()))
                log.info(
                    "step %d: %d of %d blocks unfrozen, %s trainable parameters",
                    state.global_step, plan.unfrozen_blocks(stage), plan.num_blocks, f"{plan.trainable_count():,}",
                )

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _warn_if_unfinished(plan, cfg.unfreeze_schedule, state)
            self._update(state)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._update(state)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
            if logs is not None:
                logs["trainable_params"] = plan.trainable_count()
                logs["unfrozen_blocks"] = plan.unfrozen_blocks(plan.stage)

    return GradualUnfreeze()


def trainer_extras(model: Any, cfg: PartialAdapterConfig, args: Any) -> TrainerExtras:
    plan = freeze_plan(model)
    if plan is None:
        raise ConfigError("partial fine-tuning: the model has no freeze plan; build it with peftkit.adapters.build_adapter")
    return TrainerExtras([unfreeze_callback(plan, cfg)], build_optimizer(model, plan, cfg, args))


def save(model: Any, directory: Path) -> None:
    save_model(model, directory)


METHOD = register(
    AdapterMethod(
        name="partial",
        config_class=PartialAdapterConfig,
        build=build,
        check=check,
        uses_peft=False,
        trainer_extras=trainer_extras,
        save=save,
    )
)
