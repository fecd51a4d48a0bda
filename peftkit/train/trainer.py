"""The SFT trainer: transformers `Trainer` with a loss that projects only supervised positions.

A causal LM spends a vocabulary-sized matmul and softmax on every position, but in chat SFT
only the assistant tokens (~1/3 here) carry a label. We pass a boolean `logits_to_keep` mask
so the model applies its head only where the next token is supervised, and compute the same
token-mean cross-entropy on those rows. Gradient-accumulation scaling follows the Trainer's
`num_items_in_batch` contract, so the loss equals the standard one.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from peftkit.data.chat import IGNORE_INDEX
from peftkit.errors import ConfigError, RunDirError
from peftkit.models.skeleton import active_peft_config
from peftkit.train.bucketing import length_buckets
from peftkit.train.fast_dropout import use_hashed_dropout
from peftkit.train.packing import flatten_batch, packed_rows_stay_separate
from peftkit.train.shared_prefix import SharedPrefix, attention_window, batch_prefix_length, forward_after_prefix
from peftkit.utils.modes import eval_mode

log = logging.getLogger(__name__)

def _base_forward_accepts(model: Any, name: str) -> bool:
    base = model
    for attr in ("get_base_model",):
        if hasattr(base, attr):
            base = getattr(base, attr)()
    return name in inspect.signature(base.forward).parameters


def _virtual_tokens(model: Any) -> int:
    """Prompt tuning prepends virtual tokens to the sequence; prefix tuning does not."""
    config = active_peft_config(model)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return 0
    if str(getattr(config, "peft_type", "")).endswith("PREFIX_TUNING"):
        return 0
    return int(config.num_virtual_tokens)


def _is_prompt_learning(model: Any) -> bool:
    config = active_peft_config(model)
    return bool(getattr(config, "is_prompt_learning", False))


def supervised_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose *next* token is supervised (the shift of causal LM training)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def drop_warmup_covering_all_steps(args: Any, num_training_steps: int) -> None:
    """A linear warm-up starts at learning rate 0: over every step (a 1-step epochs run, whose total only the Trainer
    knows), the run would save an untrained adapter. Train without warm-up instead, and say so."""
    warmup = args.get_warmup_steps(num_training_steps)
    if warmup and warmup >= num_training_steps:
        log.warning("train.warmup_ratio %g would make all %d steps warm-up steps, the first at learning rate 0: "
                    "training without warm-up", args.warmup_steps, num_training_steps)
        args.warmup_steps = 0


def pad_eval_rows(rows: list[dict[str, Any]], world_size: int, batch_size: int) -> list[dict[str, Any]]:
    """With several processes, the eval rows padded to a multiple of (processes x per-device batch) with rows that
    carry no loss token.

    Otherwise accelerate evens out the processes' last batches with rows from the start of the set, whose loss is
    then counted twice (and early stopping, the overfitting warning and the summary see a wrong eval loss). Under
    ZeRO-3 every rank must still run the same number of forward passes, so the set is padded, not truncated."""
    missing = -len(rows) % (world_size * batch_size) if rows and world_size > 1 else 0
    if not missing:
        return rows
    shortest = min(rows, key=lambda row: len(row["input_ids"]))
    filler = {"input_ids": list(shortest["input_ids"]), "labels": [IGNORE_INDEX] * len(shortest["input_ids"])}
    return [*rows, *(dict(filler) for _ in range(missing))]


def _several_forwards_refused(trainer: "SFTTrainer") -> list[str]:
    """Why this run cannot split a step into several forward calls (shared prefix, length buckets): DDP/ZeRO wrappers
    expect exactly one forward per backward, and NEFTune's noise scales with 1/sqrt(sequence length)."""
    args, reasons = trainer.args, []
    if trainer.is_deepspeed_enabled or args.world_size > 1:
        runner = "DeepSpeed" if trainer.is_deepspeed_enabled else f"{args.world_size} processes"
        reasons.append(f"{runner} expects exactly one forward pass per backward")
    if args.neftune_noise_alpha is not None:
        reasons.append("train.neftune_noise_alpha is set, and NEFTune's noise scales with each sequence's length, "
                       "which splitting a batch would change")
    return reasons


def _prefix_cache_refused(trainer: "SFTTrainer") -> list[str]:
    """Why the shared prefix's cache cannot be used: it must be ours (not prefix/prompt tuning's), activations kept
    (no checkpointing; QLoRA turns it on in the model itself, not via args) and the head sparse."""
    reasons = []
    if _is_prompt_learning(trainer.model):
        reasons.append("prefix/prompt tuning puts its own virtual tokens before the prompt")
    if trainer.args.activation_checkpointing or getattr(trainer.model, "is_activation_checkpointing", False):
        reasons.append("gradient checkpointing would add the shared prefix's cache twice when it recomputes a layer")
    if not trainer.sparse_logits:
        reasons.append("the vocabulary projection runs on every position (train.supervised_logits_only is off, or "
                       "the model takes no logits_to_keep)")
    return reasons


def speed_options_off(share_off: bool, bucket_off: bool, both: list[str], share_only: list[str]) -> str | None:
    """One line naming the requested speed options this run turns off, and why (None when none is): the recipe
    asked for them, so their silent absence would read as slow steps without a cause."""
    if share_off and bucket_off:
        off, reasons = "train.share_prompt_prefix and train.bucket_within_batch are", both + [
            f"train.share_prompt_prefix also because {reason}" for reason in share_only]
    elif share_off or bucket_off:
        off, reasons = ("train.share_prompt_prefix is", both + share_only) if share_off else ("train.bucket_within_batch is", both)
    else:
        return None
    return f"{off} off for this run (the same loss, slower steps): {'; '.join(reasons)}"


class RunTrainer(Trainer):
    """What both of peftkit's trainers (chat SFT and classification) add to transformers' Trainer: a warm-up that
    would cover every step is dropped, the evaluations are timed so the training speed can leave them out, and LoRA's
    dropout masks on a CPU come from a hashed counter (`hashed_dropout`, `peftkit/train/fast_dropout.py`)."""

    def get_decay_parameter_names(self, model: Any) -> list[str]:
        from peftkit.adapters.registry import decayed_parameter_names

        return sorted(decayed_parameter_names(model))

    def __init__(self, *args: Any, hashed_dropout: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.n_gpu > 1:  # as transformers does for a model split over GPUs
            log.warning("%d CUDA GPUs are visible to this one process: it trains on one of them (%s), not in "
                        "nn.DataParallel, which would split each of its forward calls and the batch size with them; "
                        "train on all of them with `peftkit train RECIPE --nproc %d` (one process a GPU), or choose "
                        "the GPU with CUDA_VISIBLE_DEVICES", self.args.n_gpu, self.args.device, self.args.n_gpu)
            self.args._n_gpu = 1
        if hashed_dropout and self.args.device.type == "cpu":  # torch's CPU dropout masks are drawn serially
            use_hashed_dropout(self.model)
        self.eval_seconds_in_training = 0.0
        """Seconds spent in evaluate() during train() (perf_counter: `eval_runtime` reads the wall clock)."""

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        if self.lr_scheduler is None:
            drop_warmup_covering_all_steps(self.args, num_training_steps)
        return super().create_scheduler(num_training_steps, optimizer)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        started = time.perf_counter()
        # Evaluating must leave training's random stream alone: its DataLoader draws a seed from torch's generator,
        # so a run resumed from a checkpoint saved just before an evaluation (the last step of an epoch) drew other
        # dropout masks than the run that went on through that evaluation.
        cuda = [self.args.device] if self.args.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            metrics = super().evaluate(*args, **kwargs)
        # transformers times the model's preparation (the DDP wrap) once, at the first evaluation, but subtracts it
        # from every later evaluation's runtime: eval_runtime came out negative (multi-process runs; a classifier on
        # a busy CPU). Count it once.
        self.__dict__.pop("model_preparation_time", None)
        if self.is_in_train:  # the evaluations before and after training are not part of train_seconds
            self.eval_seconds_in_training += time.perf_counter() - started
        return metrics


PREFIX_ENCODER_FILE = "prefix_encoder.safetensors"
"""In each checkpoint of a `prefix_projection` run: the prefix encoder as trained (embedding and MLP). peft saves the
prefix in its projected, inference-only form, which cannot be trained from (resume, early stopping's best)."""


def _projected_prefix_encoder(model: Any) -> torch.nn.Module | None:
    """The trained prefix encoder of a prefix-tuning model with `prefix_projection`, or None."""
    config = active_peft_config(model)
    if config is None or not getattr(config, "prefix_projection", False):
        return None
    return model.prompt_encoder[model.active_adapter]


class SFTTrainer(RunTrainer):
    def __init__(
        self, *args: Any, supervised_logits_only: bool = True, share_prompt_prefix: bool = True,
        bucket_within_batch: bool = True, packing: bool = False, method_optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.method_optimizer = method_optimizer
        # Padding-free batches replace the length buckets and the shared prefix (whose cache would hide the joined
        # rows from transformers' packed-sequence detection).
        self.packing = packing
        if packing:
            share_prompt_prefix = bucket_within_batch = False
            self._check_packing()
        self.sparse_logits = supervised_logits_only and _base_forward_accepts(self.model, "logits_to_keep")
        # Shared prefixes and length buckets both run several forward calls per optimizer step.
        one_forward_only, no_prefix_cache = _several_forwards_refused(self), _prefix_cache_refused(self)
        self.share_prefix = share_prompt_prefix and not one_forward_only and not no_prefix_cache
        self.attention_window = attention_window(self.model)
        self.bucket_batches = bucket_within_batch and not one_forward_only
        # Back-propagate each bucket but the last as soon as it has run (False holds every bucket's activations until
        # one backward: only benchmarks.bucket_memory turns it off, to measure what the early backward saves).
        self.backward_each_bucket = True
        speed_note = speed_options_off(share_prompt_prefix and not self.share_prefix,
                                       bucket_within_batch and not self.bucket_batches, one_forward_only, no_prefix_cache)
        if speed_note and self.is_world_process_zero():
            log.info(speed_note)
        self.virtual_tokens = _virtual_tokens(self.model)
        # Ask the Trainer to count supervised tokens across the accumulated batch (num_items_in_batch).
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self.supervised_tokens_seen = 0
        self.input_tokens_seen = 0

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The adapter method's own optimizer when it has one (partial's layer-wise learning rates, LoRA+'s faster B
        matrices), else the Trainer's default.

        Passing it as `optimizers=` is not enough: under DeepSpeed, transformers' `deepspeed_init` drops that optimizer
        and calls this method for a new one. Handing it out here serves DeepSpeed and plain runs alike; the LR
        scheduler then scales every group from its own learning rate."""
        if self.optimizer is None and self.method_optimizer is not None:
            self.optimizer = self.method_optimizer
        return super().create_optimizer(model)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        teacher = {k: inputs.pop(k) for k in ("teacher_ids", "teacher_probs") if k in inputs}
        targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
        if model.training:
            self.supervised_tokens_seen += int(targets.numel())
            self.input_tokens_seen += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else labels.numel()
        if self.packing and set(inputs) == {"input_ids", "attention_mask"}:
            inputs, labels = flatten_batch(inputs, labels)
        buckets = None
        if self.bucket_batches and not return_outputs and "attention_mask" in inputs and set(inputs) <= {"input_ids", "attention_mask"}:
            buckets = length_buckets(inputs["attention_mask"].sum(dim=1).tolist())
        if num_items_in_batch is None:
            denominator: torch.Tensor | int | float = max(int(targets.numel()), 1)
        else:
            denominator = num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                # num_items_in_batch is summed over processes; DDP averages gradients over them.
                denominator = denominator / self.accelerator.num_processes
        prefix = self._shared_prefix(model, inputs, labels)
        early_prefix = prefix
        if buckets is None or len(buckets) == 1:
            loss, outputs = self._loss_sum(model, inputs, labels, teacher, prefix)
        else:  # same rows, same token-sum loss; each bucket padded only to its own longest row
            # Training: every bucket but the last is back-propagated at once, so its activations are freed
            # before the next bucket runs (peak memory of the largest bucket, not of the whole batch); the
            # returned loss carries the earlier buckets' value detached and the last bucket's graph.
            backward_early = self.backward_each_bucket and model.training and torch.is_grad_enabled()
            if prefix is not None and backward_early and prefix.requires_grad:
                early_prefix = prefix.detached()
            loss, outputs = 0.0, None
            counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
            offsets = [0]
            for count in counts:
                offsets.append(offsets[-1] + count)
            for number, rows in enumerate(buckets, start=1):
                index = torch.tensor(rows, device=labels.device)
                width = int(inputs["attention_mask"][index].sum(dim=1).max())
                part = {k: v[index, :width] for k, v in inputs.items()}
                part_teacher = {k: torch.cat([v[offsets[r] : offsets[r + 1]] for r in rows]) for k, v in teacher.items()}
                last = number == len(buckets)
                part_loss, outputs = self._loss_sum(model, part, labels[index, :width], part_teacher,
                                                    prefix if last else early_prefix)
                if backward_early and not last:
                    self.accelerator.backward(part_loss / denominator)
                    part_loss, outputs = part_loss.detach(), None  # its cache and logits freed before the next bucket
                loss = loss + part_loss
        loss = loss / denominator
        if early_prefix is not prefix:  # the early buckets' share of the prefix's gradient, in the last backward
            loss = loss + prefix.pending_gradient(early_prefix)
        return (loss, outputs) if return_outputs else loss

    def _virtual(self) -> int:
        # Inside peft's `disable_adapter()` (the "before" eval) prompt tuning prepends nothing.
        return 0 if getattr(self.model, "_adapters_disabled", False) else self.virtual_tokens

    def _shared_prefix(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> SharedPrefix | None:
        """The batch's shared prompt prefix, run once for all its rows and buckets; None where it is not shared."""
        if not (self.share_prefix and self.sparse_logits) or self._virtual() or set(inputs) != {"input_ids", "attention_mask"}:
            return None
        input_ids = inputs["input_ids"]
        if self.attention_window is not None and input_ids.shape[1] >= self.attention_window:
            return None
        length = batch_prefix_length(input_ids, inputs["attention_mask"], supervised_mask(labels))
        if not length:
            return None
        prefix = SharedPrefix.run(model, input_ids, length)
        if isinstance(prefix, str):  # known only once the model has run: said once, then not tried again
            self.share_prefix = False
            if self.is_world_process_zero():
                log.info("train.share_prompt_prefix is off for this run (the same loss, slower steps): %s", prefix)
            return None
        return prefix

    def _loss_sum(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, teacher: dict[str, torch.Tensor],
        prefix: SharedPrefix | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """Token-sum loss of one forward call, continuing from the rows' shared `prefix` when given (the caller
        divides by the batch's supervised tokens)."""
        targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
        virtual = self._virtual()
        if self.sparse_logits:
            keep = supervised_mask(labels)
            if virtual:
                keep = torch.cat([keep.new_zeros(keep.shape[0], virtual), keep], dim=1)
            if prefix is not None:
                outputs = forward_after_prefix(model, inputs, keep, prefix)
            else:
                outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
            logits = outputs.logits
        else:
            outputs = model(**inputs, use_cache=False)
            logits = outputs.logits[:, virtual:][:, :-1][labels[:, 1:] != IGNORE_INDEX]
        if not teacher:
            return F.cross_entropy(logits.float(), targets, reduction="sum"), outputs
        # Soft targets (distilled replay); one-hot rows reduce to the cross-entropy above.
        log_probs = torch.log_softmax(logits.float(), dim=-1).gather(1, teacher["teacher_ids"])
        return -(teacher["teacher_probs"] * log_probs).sum(), outputs

    def _check_packing(self) -> None:
        """`train.packing` on a model whose attention would cross the joined rows is refused before training. Under
        ZeRO-3 the weights are partitioned until DeepSpeed starts, so the check relies on transformers there."""
        if _is_prompt_learning(self.model):
            raise ConfigError("train.packing joins a batch's rows into one sequence, which prefix and prompt tuning's "
                              "virtual tokens cannot be placed in: set train.packing: false")
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            return
        if not packed_rows_stay_separate(self.model):
            name = type(getattr(self.model, "get_base_model", lambda: self.model)()).__name__
            raise ConfigError(f"train.packing: {name} attends across the rows joined into one sequence (its "
                              f"attention ignores the restarting position_ids): set train.packing: false")

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.is_deepspeed_enabled:  # not read there (see _load_prefix_encoder); under ZeRO-3 its tensors are shards
            return
        encoder = _projected_prefix_encoder(self.accelerator.unwrap_model(self.model))
        if encoder is not None and self.args.should_save:
            from safetensors.torch import save_file

            weights = {name: tensor.detach().cpu().contiguous() for name, tensor in encoder.state_dict().items()}
            save_file(weights, os.path.join(output_dir or self.args.output_dir, PREFIX_ENCODER_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not self._load_prefix_encoder(resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not self._load_prefix_encoder(self.state.best_model_checkpoint):
            super()._load_best_model()

    def _load_prefix_encoder(self, checkpoint: str | None, model: Any = None) -> bool:
        """A `prefix_projection` run's checkpoint loads its trained encoder (see PREFIX_ENCODER_FILE)."""
        if self.is_deepspeed_enabled:  # its engine checkpoints hold every trainable weight (and load them)
            return False
        encoder = _projected_prefix_encoder(self.accelerator.unwrap_model(model or self.model))
        if encoder is None:
            return False
        saved = os.path.join(checkpoint or "", PREFIX_ENCODER_FILE)
        if not os.path.isfile(saved):  # peft's own file holds the inference form: loading it fails on sizes
            raise RunDirError(f"{checkpoint} has no {PREFIX_ENCODER_FILE} (saved by an earlier peftkit), so this "
                              "prefix_projection run cannot be trained from it: start the run again with --force")
        from safetensors.torch import load_file

        encoder.load_state_dict(load_file(saved), strict=True)
        return True

    def eval_loss_unwrapped(self) -> float:
        """The eval loss before DeepSpeed or DDP wraps the model: `evaluate()` would set up a ZeRO inference
        engine at this point (and refuses to below stage 3), and under DDP it leaves the model registered so that
        training never wraps it in DistributedDataParallel. Every rank computes it on the full eval set, as the
        same token mean as `evaluate()` (see `evaluation_loop`)."""
        from torch.utils.data import DataLoader

        loader = DataLoader(self.eval_dataset, batch_size=self.args.per_device_eval_batch_size,
                            collate_fn=self.data_collator, shuffle=False)
        total = weight = 0.0
        with eval_mode(self.model), torch.no_grad():
            for batch in loader:
                batch = {k: v.to(self.args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                total += float(self.compute_loss(self.model, batch)) * tokens
                weight += tokens
        return total / weight if weight else float("nan")

    def evaluation_loop(self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> Any:
        """The eval loss as a token mean over the whole set (what `peftkit eval` and perplexity use), not the
        Trainer's mean of per-batch means, which weights the tokens of short batches more."""
        self._eval_totals = [0.0, 0]
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        loss_sum, tokens = self._eval_totals
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            totals = torch.tensor([loss_sum, float(tokens)], dtype=torch.float64, device=self.args.device)
            torch.distributed.all_reduce(totals)
            loss_sum, tokens = float(totals[0]), int(totals[1])
        if tokens and f"{metric_key_prefix}_loss" in output.metrics:
            output.metrics[f"{metric_key_prefix}_loss"] = loss_sum / tokens
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):  # type: ignore[override]
        """Eval loss through the same sparse path (token-mean over the batch; its token sum is kept for the set's
        token mean, see `evaluation_loop`)."""
        if not prediction_loss_only or self.compute_loss_func is not None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        tokens = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
        totals = getattr(self, "_eval_totals", None)
        if totals is not None:
            totals[0] += float(loss) * tokens
            totals[1] += tokens
        return loss.detach(), None, None
