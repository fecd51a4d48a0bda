"""Peak memory of one training step with and without length buckets.

    python -m benchmarks.bucket_memory [--recipe recipes/quickstart.yaml] [--lengths 330x4 60x4]

A batch of long and short rows (random token ids, every token supervised, so neither the shared
prompt prefix nor supervised-only logits play a part) takes one forward and backward pass through
the recipe's model and adapter with peftkit's trainer, in a fresh process per variant:

- buckets: the default; each length bucket but the last is back-propagated as soon as it has run.
- buckets-one-backward: the same buckets, every bucket's activations held until one backward.
- padded: the whole batch padded to its longest row (`train.bucket_within_batch: false`).

Peak RSS (the process's high-water mark, model loading included: `loaded_rss_mb` is the mark before the
step) on CPU, peak allocated GPU memory on a GPU. The CPU figure moves by several hundred MB from one
process to the next (glibc's allocator, threads freeing into their own arenas): each variant runs
`--repeats` times and the report gives the median and the range.
Writes benchmarks/results/<date>_<machine>_bucket_memory.{md,csv}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import environment, markdown_table, results_stem, write_csv

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("buckets", "buckets-one-backward", "padded")


def parse_lengths(specs: list[str]) -> list[int]:
    """`330x4 60x4` -> four rows of 330 tokens and four of 60."""
    lengths = []
    for spec in specs:
        length, _, count = spec.partition("x")
        if not length.isdigit() or not (count or "1").isdigit() or int(length) < 2:
            raise SystemExit(f"--lengths: {spec!r} is not LENGTHxCOUNT (e.g. 330x4) with a length of at least 2")
        lengths += [int(length)] * int(count or 1)
    return lengths


def measure(recipe_path: str, variant: str, lengths: list[int]) -> dict:
    """One step of `variant` in this process (run it in a fresh one: the RSS mark never goes down)."""
    import torch
    from transformers import TrainingArguments, set_seed

    from peftkit.adapters import build_adapter
    from peftkit.config import load_recipe
    from peftkit.data import PaddingCollator
    from peftkit.models import load_model, load_tokenizer, resolve_device, resolve_dtype
    from peftkit.train.bucketing import length_buckets
    from peftkit.train.deepspeed import precision_flags
    from peftkit.utils.threads import choose_threads, omp_threads
    from peftkit.train.trainer import SFTTrainer
    from peftkit.utils.memory import peak_rss_mb

    recipe = load_recipe(recipe_path)
    choose_threads(recipe.train.num_threads or omp_threads(), "benchmarking", "train.num_threads", on_cpu=False)
    set_seed(recipe.train.seed)
    device = resolve_device(recipe.train.device)
    dtype = resolve_dtype(recipe.train.dtype, device)
    bf16, fp16 = precision_flags(device, dtype)
    tokenizer = load_tokenizer(recipe.model)
    model = build_adapter(load_model(recipe.model, device=device, dtype=dtype), recipe.adapter)
    model.train()
    generator = torch.Generator().manual_seed(recipe.train.seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    rows = []
    for length in lengths:
        ids = torch.randint(0, vocab, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    batch = PaddingCollator(tokenizer.pad_token_id)(rows)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=len(lengths), report_to="none",
                                 use_cpu=device == "cpu", bf16=bf16, fp16=fp16, disable_tqdm=True,
                                 remove_unused_columns=False)
        trainer = SFTTrainer(model=model, args=args, data_collator=PaddingCollator(tokenizer.pad_token_id),
                             bucket_within_batch=variant != "padded")
        trainer.backward_each_bucket = variant != "buckets-one-backward"
        loaded = round(peak_rss_mb(), 1)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        batch = {k: v.to(model.device) for k, v in batch.items()}
        loss = trainer.training_step(model, batch)
    buckets = length_buckets(lengths) if trainer.bucket_batches else [list(range(len(lengths)))]
    return {
        "variant": variant,
        "rows": len(lengths),
        "buckets": len(buckets),
        "padded_tokens": sum(len(b) * max(lengths[i] for i in b) for b in buckets),
        "loss": round(float(loss), 4),
        "loaded_rss_mb": loaded,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
    }


def summarise(runs: list[dict]) -> dict:
    """One row per variant: the first run's description, the median peak and the range over the runs."""
    peaks = sorted(r["peak_gpu_mb"] if r["peak_gpu_mb"] is not None else r["peak_rss_mb"] for r in runs)
    key = "peak_gpu_mb" if runs[0]["peak_gpu_mb"] is not None else "peak_rss_mb"
    return {**runs[0], key: statistics.median(peaks), f"{key}_range": f"{peaks[0]}-{peaks[-1]}", "repeats": len(runs),
            "loaded_rss_mb": statistics.median(r["loaded_rss_mb"] for r in runs)}


def run_variant(recipe: str, variant: str, lengths: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bucket_memory", "--recipe", recipe, "--worker", variant,
                           "--lengths", *lengths], capture_output=True, text=True, timeout=3600, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/quickstart.yaml", help="model and adapter (default: %(default)s)")
    parser.add_argument("--lengths", nargs="+", default=["330x4", "60x4"],
                        help="the batch's rows as LENGTHxCOUNT (default: %(default)s)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="default: all of them")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per variant (default: %(default)s)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    lengths = parse_lengths(args.lengths)
    if args.worker:
        print(json.dumps(measure(args.recipe, args.worker, lengths)), flush=True)
        return
    runs: dict[str, list[dict]] = {variant: [] for variant in args.variants}
    for _ in range(args.repeats):  # interleaved, so a drift of the machine touches every variant alike
        for variant in args.variants:
            runs[variant].append(run_variant(args.recipe, variant, args.lengths))
            print(json.dumps(runs[variant][-1]), flush=True)
    rows = [summarise(measured) for measured in runs.values()]
    stem = results_stem("bucket_memory")
    write_csv(stem, rows)
    peak = "peak_gpu_mb" if rows[0]["peak_gpu_mb"] is not None else "peak_rss_mb"
    columns = ["variant", "rows", "buckets", "padded_tokens", "loss", "loaded_rss_mb", peak, f"{peak}_range", "repeats"]
    lines = ["# Peak memory of one training step: length buckets against a padded batch", "",
             f"Recipe `{args.recipe}`, one batch of rows {' '.join(args.lengths)} (random token ids, every token "
             "supervised), one forward and backward pass with peftkit's trainer, a fresh process per variant. "
             "`buckets` back-propagates each bucket but the last as soon as it has run; `buckets-one-backward` holds "
             "every bucket's activations until one backward; `padded` runs the whole batch padded to its longest "
             "row. `loaded_rss_mb`: the peak before the step (model loading). Medians over fresh processes, with "
             "the range.", "",
             f"`python -m benchmarks.bucket_memory --recipe {args.recipe} --lengths {' '.join(args.lengths)} "
             f"--repeats {args.repeats}`", "",
             *markdown_table(rows, columns), "", environment()]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md and .csv")


if __name__ == "__main__":
    main()
