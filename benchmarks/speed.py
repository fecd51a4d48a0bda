"""Training speed: peftkit vs the plain transformers Trainer + peft reference, same run, same data.

    python -m benchmarks.speed [--recipe recipes/quickstart.yaml] [--epochs 1] [--variants NAME ...]

Each variant runs in its own process, one after the other (never concurrently: 2 cores).
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
            "peftkit-no-bucket"]


def run_variant(recipe: str, variant: str, epochs: float) -> dict:
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.speed_worker", "--recipe", recipe, "--variant", variant,
             "--epochs", str(epochs), "--out", out],
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
    args = parser.parse_args()

    peak = matmul_peak_gflops()
    body, head = lora_flops_per_token(args.recipe)
    rows = []
    for variant in args.variants:
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        result = run_variant(args.recipe, variant, args.epochs)
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
    reference = next((r for r in rows if r["variant"] == "reference"), rows[0])
    for row in rows:
        row["speedup_vs_reference"] = round(row["supervised_tokens_per_second"] / reference["supervised_tokens_per_second"], 3)
    write_report(rows, peak, args)


def write_report(rows: list[dict], peak: float, args: argparse.Namespace) -> None:
    # One report per training length: a full-length comparison does not replace the 1-epoch one.
    stem = results_stem("speed" if args.epochs == 1.0 else f"speed_{args.epochs:g}ep")
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_csv(stem, rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    ax.barh([r["variant"] for r in rows], [r["supervised_tokens_per_second"] for r in rows], color="#1f77b4")
    for i, r in enumerate(rows):
        ax.text(r["supervised_tokens_per_second"], i, f" {r['speedup_vs_reference']:.2f}x", va="center")
    ax.set_xlabel("supervised tokens / s (higher is better)")
    ax.set_title(f"LoRA SFT speed, {Path(args.recipe).stem}")
    fig.tight_layout()
    fig.savefig(f"{stem}.png")
    columns = ["variant", "train_seconds", "supervised_tokens_per_second", "input_tokens_per_second", "speedup_vs_reference",
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
        f"Matmul peak (2048x2048, fp32 on a CPU / bf16 on a GPU, same machine, same run): {peak:.1f} GFLOP/s. Achieved GFLOP/s counts the LoRA "
        "training FLOPs each variant executes (forward + input-gradient backward of the frozen body on every position it "
        "computes, padding included and a shared prompt prefix once, plus the vocabulary head where it is computed): "
        "the machine's utilisation. Useful GFLOP/s counts the same work for every variant (the body on every real token "
        "of every row, the head on supervised positions): what skipping work buys shows there, not in utilisation.",
        "",
        "## Environment",
        "",
        "```",
        environment(),
        "```",
        "",
        f"Command: `python -m benchmarks.speed --recipe {args.recipe} --epochs {args.epochs:g}"
        + (f" --variants {' '.join(args.variants)}`" if args.variants != VARIANTS else "`"),
    ]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md / .csv / .png", file=sys.stderr)


if __name__ == "__main__":
    main()
