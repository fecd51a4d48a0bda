"""Training speed: peftkit vs the plain transformers Trainer + peft reference, same run, same data.

    python -m benchmarks.speed [--recipe recipes/quickstart.yaml] [--epochs 1] [--variants NAME ...] [--seeds 42 1 2]

Each variant runs in its own process, one after the other (never concurrently: 2 cores). With several seeds, every
seed is one round of all variants, each round in another order (the host's speed drifts: no variant always runs
first), and the report gives each variant's median and range and the ratios paired within a round.
Writes benchmarks/results/<date>_<machine>_speed.{md,csv,png}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import environment, markdown_table, write_csv, matmul_peak_gflops, results_stem

VARIANTS = ["reference", "peftkit", "peftkit-grouped", "peftkit-packed", "peftkit-no-prefix", "peftkit-no-sparse",
            "peftkit-no-bucket", "peftkit-torch-dropout"]


def run_variant(recipe: str, variant: str, epochs: float, seed: int | None = None) -> dict:
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.speed_worker", "--recipe", recipe, "--variant", variant,
             "--epochs", str(epochs), "--out", out, *(["--seed", str(seed)] if seed is not None else [])],
            capture_output=True, text=True, timeout=3600,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def lora_flops_per_token(recipe: str) -> tuple[float, float]:
    """(body FLOPs per input token, head FLOPs per projected position) for LoRA training.

    Frozen base: forward 2N plus input-gradient backward 2N per token (no weight gradients);
    the vocabulary head costs 2*V*d forward and 2*V*d backward per projected position.
    """
    from peftkit.config import load_recipe
    from peftkit.models.resolve import resolve_model_ref
    from peftkit.models.skeleton import load_config

    recipe_obj = load_recipe(recipe)
    config = load_config(resolve_model_ref(recipe_obj.model.name), recipe_obj.model)
    needed = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    if not all(isinstance(getattr(config, name, None), int) for name in needed):  # GPT-2, NeoX ... name them otherwise
        raise SystemExit(f"benchmarks.speed counts FLOPs for Llama-shaped models (gated MLP, grouped KV heads); "
                         f"{config.model_type} needs its own count in lora_flops_per_token")
    d, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * inter
    body = 4 * layers * per_layer
    head = 4 * config.vocab_size * d
    return float(body), float(head)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/quickstart.yaml",
                        help="model, data and settings (default: %(default)s)")
    parser.add_argument("--epochs", type=float, default=1.0,
                        help="epochs each variant trains (default: %(default)s; the README's headline table: 5)")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS, metavar="VARIANT",
                        help=f"which trainers to time, one after the other (default: all: {' '.join(VARIANTS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                        help="one round of all variants per seed, instead of the recipe's train.seed once")
    args = parser.parse_args()

    peak = matmul_peak_gflops()
    body, head = lora_flops_per_token(args.recipe)
    rows = []
    for variant, seed in run_order(args.variants, args.seeds):
        print(f"running {variant}" + (f" (seed {seed})" if seed is not None else "") + " ...", file=sys.stderr, flush=True)
        result = run_variant(args.recipe, variant, args.epochs, seed)
        sparse = variant not in {"reference", "peftkit-no-sparse"}
        projected = result["supervised_tokens"] if sparse else result["padded_tokens"]
        # Executed: what the variant computes (its padding, a shared prefix once, the head where it projects): the
        # machine's utilisation. Useful: the work the loss needs, the same for every variant (the body on every
        # real token of every row, the head on supervised positions): a skipped computation counts as done.
        executed = body * result["computed_positions"] + head * projected
        useful = body * result["input_tokens"] + head * result["supervised_tokens"]
        result["achieved_gflops"] = round(executed / result["train_seconds"] / 1e9, 1)
        result["share_of_peak"] = round(result["achieved_gflops"] / peak, 3)
        result["useful_gflops"] = round(useful / result["train_seconds"] / 1e9, 1)
        rows.append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)
    baseline = "reference" if "reference" in args.variants else args.variants[0]  # without it: the first named
    for row in rows:  # against the baseline of the same round (seed)
        reference = next(r for r in rows if r["seed"] == row["seed"] and r["variant"] == baseline)
        row["speedup_vs_reference"] = round(row["supervised_tokens_per_second"] / reference["supervised_tokens_per_second"], 3)
        row["eval_loss_vs_reference"] = round(row["eval_loss"] - reference["eval_loss"], 4)
    if baseline != "reference":
        print(f"no reference run: the ratios are against {baseline}", file=sys.stderr)
    write_report(rows, peak, args)


def run_order(variants: list[str], seeds: list[int] | None) -> list[tuple[str, int | None]]:
    """Round r runs the variants rotated by r places."""
    if not seeds:
        return [(variant, None) for variant in variants]
    order = []
    for r, seed in enumerate(seeds):
        shift = r % len(variants)
        order += [(variant, seed) for variant in variants[shift:] + variants[:shift]]
    return order


def summary_rows(rows: list[dict], variants: list[str]) -> list[dict]:
    """Per variant over the rounds: the median and range of its speed and of its ratio and eval-loss difference to
    the reference of the same round."""
    from statistics import median

    def spread(values: list[float], digits: int) -> str:
        low, mid, high = min(values), median(values), max(values)
        return f"{mid:.{digits}f}" if low == high else f"{mid:.{digits}f} ({low:.{digits}f} to {high:.{digits}f})"

    summary = []
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        summary.append({
            "variant": variant,
            "rounds": len(mine),
            "supervised tok/s": spread([r["supervised_tokens_per_second"] for r in mine], 1),
            "vs reference": spread([r["speedup_vs_reference"] for r in mine], 2),
            "eval loss": spread([r["eval_loss"] for r in mine], 4),
            "eval loss - reference": spread([r["eval_loss_vs_reference"] for r in mine], 4),
        })
    return summary


def write_report(rows: list[dict], peak: float, args: argparse.Namespace) -> None:
    # One report per training length: a full-length comparison does not replace the 1-epoch one.
    stem = results_stem("speed" if args.epochs == 1.0 else f"speed_{args.epochs:g}ep")
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_csv(stem, rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from statistics import median

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    variants = [v for v in args.variants if any(r["variant"] == v for r in rows)]
    speeds = [median(r["supervised_tokens_per_second"] for r in rows if r["variant"] == v) for v in variants]
    ratios = [median(r["speedup_vs_reference"] for r in rows if r["variant"] == v) for v in variants]
    ax.barh(variants, speeds, color="#1f77b4")
    for i, (speed, ratio) in enumerate(zip(speeds, ratios)):
        ax.text(speed, i, f" {ratio:.2f}x", va="center")
    ax.set_xlabel("supervised tokens / s (higher is better)")
    ax.set_title(f"LoRA SFT speed, {Path(args.recipe).stem}")
    fig.tight_layout()
    fig.savefig(f"{stem}.png")
    summary = summary_rows(rows, variants) if args.seeds else []
    rounds_table = ["Over the rounds (median, and the range; ratios and differences paired with the reference of the "
                    "same round):", "", *markdown_table(summary, list(summary[0])), ""] if summary else []
    columns = ["variant", "seed", "train_seconds", "supervised_tokens_per_second", "input_tokens_per_second", "speedup_vs_reference",
               "padding_share", "eval_loss", "train_loss", "peak_rss_mb", "achieved_gflops", "share_of_peak", "useful_gflops"]
    lines = [
        f"# Training speed: peftkit vs transformers Trainer + peft ({Path(args.recipe).name}, {args.epochs} epoch)",
        "",
        "Same model, tokenized data, LoRA config, optimizer, schedule, batch size and seed; each variant in its own "
        "process, run one after another. `reference` = transformers `Trainer` + peft with dynamic padding and the "
        "model's full-logits loss.",
        "",
        *markdown_table(rows, columns),
        "",
        *rounds_table,
        f"Matmul peak (2048x2048, fp32 on a CPU / bf16 on a GPU, same machine, same run): {peak:.1f} GFLOP/s. Achieved GFLOP/s counts the LoRA "
        "training FLOPs each variant executes (forward + input-gradient backward of the frozen body on every position it "
        "computes, padding included and a shared prompt prefix once, plus the vocabulary head where it is computed): "
        "the machine's utilisation. Useful GFLOP/s counts the same work for every variant (the body on every real token "
        "of every row, the head on supervised positions): what skipping work buys shows there, not in utilisation. "
        "Both leave out the adapter's own FLOPs (6 per trainable parameter per token, about 7 % more for a rank-16 "
        "all-linear LoRA on SmolLM2-135M) and the attention scores (a few % at these lengths): lower bounds.",
        "",
        "## Environment",
        "",
        "```",
        environment(),
        "```",
        "",
        f"Command: `python -m benchmarks.speed --recipe {args.recipe} --epochs {args.epochs:g}"
        + (f" --variants {' '.join(args.variants)}" if args.variants != VARIANTS else "")
        + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds else "") + "`",
    ]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md / .csv / .png", file=sys.stderr)


if __name__ == "__main__":
    main()
