"""One training-speed measurement in a fresh process (so peak RSS and caches are per variant).

Variants share the model, tokenized data, LoRA config, optimizer, LR schedule, batch size, seed
and number of epochs; they differ only in the trainer:

- reference: transformers `Trainer` + peft, dynamic padding (`DataCollatorForSeq2Seq`), random
  batches, the model's own loss over full logits: what a user would write by hand.
- peftkit: peftkit's `SFTTrainer` with its defaults: the reference's batches, each run as length
  buckets, supervised-only logits, shared prompt prefix (loss-exact up to float rounding and
  dropout draws); peftkit-grouped adds length grouping across the dataset (other batches); peftkit-packed
  runs each batch as one padding-free sequence (`train.packing`) instead of buckets and shared prefix
- peftkit-no-prefix / -no-sparse / -no-bucket / -torch-dropout: optimisations switched off, to measure each one's
  share (no-sparse also drops the shared prefix, which relies on it; torch-dropout draws LoRA's dropout masks from
  torch's generator instead of the hashed counter of train/fast_dropout.py).

Prints one JSON line with the measurement.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--variant", required=True, choices=["reference", "peftkit", "peftkit-grouped", "peftkit-packed", "peftkit-no-prefix",
                                                               "peftkit-no-sparse", "peftkit-no-bucket",
                                                               "peftkit-torch-dropout"])
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=None, help="instead of the recipe's train.seed")
    parser.add_argument("--count-only", action="store_true", help="print the tokens and positions a variant processes, untrained")
    args = parser.parse_args()

    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from peftkit.adapters import build_adapter
    from peftkit.config import load_recipe
    from peftkit.data import PaddingCollator, build_datasets
    from peftkit.evaluate.loss import mean_loss
    from peftkit.models import load_model, load_tokenizer, resolve_device, resolve_dtype
    from peftkit.train.bucketing import length_buckets
    from peftkit.train.deepspeed import precision_flags
    from peftkit.train.run import peak_memory_mb
    from peftkit.utils.threads import choose_threads, omp_threads
    from peftkit.train.shared_prefix import batch_prefix_length
    from peftkit.train.trainer import SFTTrainer, supervised_mask
    from peftkit.utils.memory import peak_rss_mb

    recipe = load_recipe(args.recipe)
    if args.seed is not None:
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"seed": args.seed})})
    # As `peftkit train` counts them (train.num_threads, OMP_NUM_THREADS, all usable cores), without a look at the load.
    choose_threads(recipe.train.num_threads or omp_threads(), "benchmarking", "train.num_threads", on_cpu=False)
    set_seed(recipe.train.seed)
    # Device and precision as `peftkit train` chooses them (fp32 on CPU; bf16 autocast on a bf16 GPU), for every variant.
    device = resolve_device(recipe.train.device)
    dtype = resolve_dtype(recipe.train.dtype, device)
    bf16, fp16 = precision_flags(device, dtype)
    tokenizer = load_tokenizer(recipe.model)
    data = build_datasets(recipe.data, tokenizer, recipe.train.seed)
    model = build_adapter(load_model(recipe.model, device=device, dtype=dtype), recipe.adapter)
    cfg = recipe.train
    group = args.variant == "peftkit-grouped"
    training_args = TrainingArguments(
        output_dir=str(Path(args.out) / "ckpt"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=args.epochs,
        logging_steps=10,
        save_strategy="no",
        eval_strategy="no",
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        use_cpu=device == "cpu",
        bf16=bf16,
        fp16=fp16,
        disable_tqdm=True,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if group else "random",
    )
    if args.variant == "reference":
        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True, return_tensors="pt")
        trainer = Trainer(model=model, args=training_args, train_dataset=data.train, data_collator=collator)
    else:
        collator = PaddingCollator(tokenizer.pad_token_id)
        trainer = SFTTrainer(
            model=model,
            args=training_args,
            train_dataset=data.train,
            data_collator=collator,
            supervised_logits_only=args.variant != "peftkit-no-sparse",
            share_prompt_prefix=args.variant not in {"peftkit-no-prefix", "peftkit-no-sparse"},
            bucket_within_batch=args.variant != "peftkit-no-bucket",
            packing=args.variant == "peftkit-packed",
            hashed_dropout=args.variant != "peftkit-torch-dropout",
        )
    bucketed = getattr(trainer, "bucket_batches", False)

    # Count what each variant actually processes: the same batches the trainer will draw. `computed`: positions the
    # model body runs (padding included; a prompt prefix the rows of a batch share, once per step), for executed FLOPs.
    padded = real = supervised = computed = 0
    share = getattr(trainer, "share_prefix", False)
    # A length-grouped sampler draws from the global generators: put them back afterwards, so the trainer draws the
    # batches counted here (and dropout the same masks as without the count).
    rng_states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    for batch in trainer.get_train_dataloader():
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        if getattr(trainer, "packing", False):  # one padding-free sequence per batch
            padded += int(batch["attention_mask"].sum())
            computed += int(batch["attention_mask"].sum())
        else:  # what the length buckets actually run (train/bucketing.py), or the whole padded batch
            width = batch["input_ids"].shape[1]
            groups = length_buckets(lengths) if bucketed else [list(range(len(lengths)))]
            prefix = batch_prefix_length(batch["input_ids"], batch["attention_mask"], supervised_mask(batch["labels"])) if share else 0
            computed += prefix  # run once per step, for all of its buckets
            for rows in groups:
                w = max(lengths[i] for i in rows) if bucketed else width
                padded += len(rows) * w
                computed += len(rows) * (w - prefix)
        real += int(batch["attention_mask"].sum())
        supervised += int((batch["labels"][:, 1:] != -100).sum())
    random.setstate(rng_states[0])
    np.random.set_state(rng_states[1])
    torch.set_rng_state(rng_states[2])
    epochs = args.epochs
    if args.count_only:  # what a variant would process now, untrained (before 2026-12-06 the prefix ran once per bucket)
        print(json.dumps({"variant": args.variant, "input_tokens": real, "padded_tokens": padded,
                          "computed_positions": computed, "supervised_tokens": supervised}), flush=True)
        return
    started = time.perf_counter()
    output = trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    loss = mean_loss(model, data.eval, tokenizer.pad_token_id)
    result = {
        "variant": args.variant,
        "seed": recipe.train.seed,
        "epochs": epochs,
        "steps": output.global_step,
        "train_seconds": round(seconds, 2),
        "supervised_tokens": int(supervised * epochs),
        "input_tokens": int(real * epochs),
        "padded_tokens": int(padded * epochs),
        "computed_positions": int(computed * epochs),
        "padding_share": round(1 - real / padded, 4),
        "supervised_tokens_per_second": round(supervised * epochs / seconds, 2),
        "input_tokens_per_second": round(real * epochs / seconds, 2),
        "train_loss": round(float(output.training_loss), 4),
        "eval_loss": round(loss, 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_gpu_mb": round(peak_memory_mb(device), 1) if device == "cuda" else None,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
