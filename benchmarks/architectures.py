"""Does every step run on model families peftkit was not developed on?

Tiny random models of each family (built from configs with the built-in model's tokenizer, so nothing is
downloaded) go through what a new user runs: `peftkit train` (a few LoRA steps on the quickstart data),
`peftkit chat --prompt`, and each export format (`adapter`, merged `hf`, `gguf`, `gguf-adapter`). Each step is
ok, refused (peftkit's one-line error, which is the intended outcome for a format a family cannot have) or
crashed (a traceback: a bug). Written to `results/<date>_<machine>_architectures.{md,csv}`.

    python -m benchmarks.architectures [--only gemma2 phi3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import write_table_report

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)
GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=32)  # a window the training rows cross

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama-3.1-rope": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 128}}),
    "mistral": ("mistral", {"sliding_window": 32}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 32}),
    "phi3": ("phi3", {}),
    "gemma2": ("gemma2", GEMMA),
    "gemma3": ("gemma3_text", {**GEMMA, "num_hidden_layers": 6}),
    "gemma3-vision": ("gemma3", {}),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {}),
    "gpt_neox": ("gpt_neox", {"num_key_value_heads": None}),
    "gpt2": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4}),
}
STEPS = ("train", "chat", "adapter", "hf", "gguf", "gguf-adapter")


def build_family(name: str, folder: Path, tokenizer: Any) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma3Config

    model_type, extra = FAMILIES[name]
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    settings = {k: v for k, v in {**SMALL, **extra}.items() if v is not None}
    if model_type == "gemma3":  # the vision-language checkpoint layout (Gemma 3 4B and larger)
        vocab = len(tokenizer) + 8
        config = Gemma3Config(
            text_config={**settings, **GEMMA, "vocab_size": vocab},
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14),
            mm_tokens_per_image=4, image_token_index=vocab - 3, boi_token_index=vocab - 2, eoi_token_index=vocab - 1,
            **ids)
    else:
        config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **settings, **ids)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger than the default init, so the exports' logit checks compare real differences
        for param in model.parameters():
            param.normal_(0.0, 0.1 if param.dim() == 2 else 0.5)
    path = folder / name
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def recipe(name: str, model_dir: Path, run_dir: Path) -> str:
    data = ROOT / "recipes" / "data" / "quickstart"
    return f"""name: arch-{name}
model:
  name: {model_dir}
adapter:
  method: lora
  r: 8
  alpha: 16
  target_modules: all-linear
data:
  train: {data / 'train.jsonl'}
  heldout: {data / 'heldout.jsonl'}
  max_seq_len: 256
  system_prompt: You are the help-desk assistant of the Brightwater Community Library.
train:
  max_steps: 3
  batch_size: 4
eval:
  max_new_tokens: 8
output_dir: {run_dir}
"""


def outcome(command: list[str], home: Path) -> tuple[str, float]:
    """ok / refused: <peftkit's message> / crashed: <exception line>, and the wall time."""
    import os

    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "peftkit.cli", *command], capture_output=True, text=True,
                          env={**os.environ, "PEFTKIT_HOME": str(home)}, timeout=900)
    seconds = time.perf_counter() - start
    if done.returncode == 0:
        return "ok", seconds
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    if "Traceback (most recent call last):" in done.stderr:
        return "crashed: " + next((l for l in reversed(lines) if "Error" in l), lines[-1])[:120], seconds
    message = next((l for l in lines if l.startswith("error:")), lines[-1] if lines else "")
    return "refused: " + message.removeprefix("error: ").split("; ")[0][:100], seconds


def run_family(name: str, work: Path, tokenizer: Any) -> dict[str, Any]:
    model_dir = build_family(name, work / "models", tokenizer)
    run_dir = work / "runs" / name
    recipe_path = work / f"{name}.yaml"
    recipe_path.write_text(recipe(name, model_dir, run_dir))
    row: dict[str, Any] = {"family": name, "model_type": FAMILIES[name][0]}
    commands = {"train": ["train", str(recipe_path)], "chat": ["chat", str(run_dir), "--prompt", "When are you open?"],
                **{fmt: ["export", str(run_dir), "--format", fmt] for fmt in STEPS[2:]}}
    total = 0.0
    for step in STEPS:
        row[step], seconds = outcome(commands[step], work / "home")
        total += seconds
        print(f"{name:16s} {step:13s} {row[step]}", flush=True)
        if step == "train" and row[step] != "ok":
            break
    row["gguf in llama.cpp"] = in_llama_cpp(run_dir / "gguf" / "verification.json")
    row["seconds"] = round(total, 1)
    return row


def in_llama_cpp(report_path: Path) -> str:
    """What running the GGUF export in llama.cpp itself gave (peftkit's verification, when llama-cpp-python is
    installed): the largest logit difference relative to the largest logit, and greedy-token agreement."""
    if not report_path.is_file():
        return "-"
    report = json.loads(report_path.read_text(encoding="utf-8")).get("llama_cpp", {})
    if not report.get("ran"):
        return f"not run: {report.get('why', 'no llama.cpp check in this report')}"
    relative = report["max_abs_diff"] / max(1.0, report["max_abs_reference_logit"])
    return (f"{'ok' if report['passed'] else 'FAILED'}: max diff {relative:.1e} of the largest logit, "
            f"agreement {report['greedy_agreement']:.0%}{'' if report['tokenizer_match'] else ', tokenization differs'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(FAMILIES), help="these families only")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from peftkit.models.resolve import materialize, resolve_model_ref

    tokenizer = AutoTokenizer.from_pretrained(materialize(resolve_model_ref("smollm2-135m-instruct")))
    with tempfile.TemporaryDirectory(prefix="peftkit-arch-") as tmp:
        rows = [run_family(name, Path(tmp), tokenizer) for name in args.only or FAMILIES]
    intro = ("# Model families through the whole pipeline\n\n"
             "Tiny random models of each family (SmolLM2's tokenizer), LoRA `all-linear` r 8, 3 training steps on the "
             "quickstart data, then chat and every export format, each verified by peftkit as usual. `refused` is "
             "peftkit's own message (the intended answer where a format cannot hold that family); `crashed` would be "
             "a bug. `gguf in llama.cpp`: the GGUF export (f16) run in llama.cpp itself by peftkit's verification "
             f"(llama-cpp-python), logits along the reference tokens and llama.cpp's own tokenization. Command: `python -m benchmarks.architectures{' --only ' + ' '.join(args.only) if args.only else ''}`.\n\n")
    write_table_report("architectures", rows, ("family",), intro,
                       ["family", "model_type", *STEPS, "gguf in llama.cpp", "seconds"])
    return 0 if not any(str(v).startswith("crashed") for row in rows for v in row.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
