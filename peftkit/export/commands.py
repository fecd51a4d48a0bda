"""CLI sub-commands of the export area (`merge`, `export`)."""

from __future__ import annotations

import argparse
from typing import Any

from peftkit.errors import ExportError
from peftkit.export.gguf_types import GGUF_TYPES


def _print_result(result: Any) -> None:
    from rich.text import Text  # paths and notes are data: `peftkit[llama-cpp]` is not a style tag

    from peftkit.utils.console import stdout_console

    console = stdout_console(highlight=False, soft_wrap=True)
    console.print(Text.assemble(("Wrote", "green"), f" {result.kind} export to {result.path}"))
    for name in result.files:
        console.print(f"  {name}", markup=False)
    if result.qlora:
        q = result.qlora
        console.print(Text.assemble(
            "QLoRA merge into ", (str(q["base"]), "bold"), f" weights. Max |logit diff| vs {q['reference']} "
            f"on {q['prompts']} prompts: dequantized {q['quantization']['bits']}-bit base {q['dequantized_max_abs_diff']:.3g}, "
            f"original weights {q['original_max_abs_diff']:.3g} (choose with --qlora-base)"
        ))
    for note in result.notes:
        console.print(note, markup=False)
    if result.verification is None:
        console.print("[yellow]Not verified[/yellow] (--no-verify)")
    else:
        from peftkit.export.verify import summary_line

        console.print(Text.assemble(("Verified", "green"), f" in a fresh process: {summary_line(result.verification)}"))


def _threads_for(run_dirs: list[str], doing: str, *, refuse_classifiers: bool) -> None:
    """Set the command's threads from its (first) run, after refusing a classifier run where the command needs a
    causal language model: the refusal comes first, without a thread line before it."""
    from pathlib import Path

    from peftkit.export.merge import refuse_other_tasks
    from peftkit.runs import read_run_recipe, use_run_threads

    recipes = [read_run_recipe(run_dir) for run_dir in run_dirs]
    if refuse_classifiers:
        for run_dir, recipe in zip(run_dirs, recipes):
            refuse_other_tasks(Path(run_dir).expanduser().resolve(), recipe)
    use_run_threads(recipes[0], doing, on_cpu=True)


def cmd_merge(args: argparse.Namespace) -> int:
    from peftkit.export.common import parse_shard_size
    from peftkit.export.hf import export_combined, export_hf
    from peftkit.train.run_dir import reading_runs

    shard = parse_shard_size(args.shard_size)
    if args.adapters:
        if args.run_dir:
            raise ExportError("give either RUN_DIR or --adapters RUN_A RUN_B ..., not both")
        if not args.out:
            raise ExportError("--adapters needs --out DIR (where the combined model goes)")
        _threads_for(args.adapters, "merging", refuse_classifiers=True)
        with reading_runs(*args.adapters):
            result = export_combined(args.adapters, args.out, weights=args.weights, combination=args.combination,
                                     dtype=args.dtype, shard_size=shard, force=args.force, check=not args.no_verify,
                                     base=args.base, qlora_base=args.qlora_base)
    else:
        if not args.run_dir:
            raise ExportError("give the run directory to merge (peftkit merge RUN_DIR), or --adapters RUN_A RUN_B")
        if args.weights:
            raise ExportError("--weights only applies with --adapters")
        _threads_for([args.run_dir], "merging", refuse_classifiers=True)
        with reading_runs(args.run_dir):
            result = export_hf(args.run_dir, args.out, dtype=args.dtype, shard_size=shard, force=args.force,
                               check=not args.no_verify, qlora_base=args.qlora_base, base=args.base)
    _print_result(result)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from peftkit.train.run_dir import reading_runs

    # only a verified adapter export reloads a causal LM; the adapter files of a classifier export unverified
    _threads_for([args.run_dir], "exporting", refuse_classifiers=args.format != "adapter" or not args.no_verify)
    with reading_runs(args.run_dir):
        result = _export(args)
    _print_result(result)
    return 0


def _export(args: argparse.Namespace) -> Any:
    from peftkit.export.common import parse_shard_size

    check = not args.no_verify
    if args.format == "hf":
        from peftkit.export.hf import export_hf

        result = export_hf(args.run_dir, args.out, dtype=args.dtype, shard_size=parse_shard_size(args.shard_size),
                           force=args.force, check=check, qlora_base=args.qlora_base, base=args.base)
    elif args.format == "gguf":
        from peftkit.export.gguf_writer import export_gguf

        result = export_gguf(args.run_dir, args.out, gguf_type=args.gguf_type, force=args.force, check=check,
                             qlora_base=args.qlora_base, base=args.base)
    elif args.format == "gguf-adapter":
        from peftkit.export.gguf_lora import export_gguf_adapter

        result = export_gguf_adapter(args.run_dir, args.out, gguf_type=args.gguf_type, force=args.force, check=check,
                                     base=args.base)
    else:
        from peftkit.export.adapter_export import export_adapter

        result = export_adapter(args.run_dir, args.out, force=args.force, check=check, base=args.base)
    return result


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="output directory (default: inside RUN_DIR)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--no-verify", action="store_true",
                   help="skip reloading the export in a fresh process and comparing logits with the adapter")
    p.add_argument("--base", help="base model to use instead of the recipe's model.name (same architecture)")


def register(sub: Any) -> None:
    """Add this area's sub-commands to the `peftkit` parser."""
    p = sub.add_parser("merge", help="merge a run's adapter into its base: a standard Hugging Face model directory")
    p.add_argument("run_dir", nargs="?", help="run directory (output_dir of `peftkit train`)")
    _common(p)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights dtype of the merged model (default auto: the base model's; the merge itself is done in float32)")
    p.add_argument("--shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB, 500MB (default 2GB)")
    p.add_argument("--qlora-base", choices=["dequantized", "original"], default="dequantized",
                   help="QLoRA runs: merge into the dequantized 4- or 8-bit weights (what was trained) or the original ones")
    p.add_argument("--adapters", nargs="+", metavar="RUN_DIR", help="combine several LoRA runs of the same base (needs --out DIR: there is no run directory to write into)")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per --adapters run (default: equal)")
    p.add_argument("--combination", choices=["cat", "linear", "svd"], default="cat",
                   help="peft add_weighted_adapter combination (cat = exact weighted sum of the updates)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="export a run: merged HF model, GGUF (+ Ollama Modelfile), or the adapter alone")
    p.add_argument("run_dir", help="run directory (output_dir of `peftkit train`)")
    p.add_argument("--format", required=True, choices=["hf", "gguf", "adapter", "gguf-adapter"])
    _common(p)
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default="f16",
                   help="GGUF tensor type (default f16; gguf-adapter: f32, f16 or q8_0)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="--format hf weights dtype (default auto: the base model's)")
    p.add_argument("--shard-size", default="2GB", help="--format hf: largest safetensors shard")
    p.add_argument("--qlora-base", choices=["dequantized", "original"], default="dequantized",
                   help="QLoRA runs: which weights the adapter is merged into (hf, gguf)")
    p.set_defaults(func=cmd_export)
