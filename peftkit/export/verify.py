"""Prove an export behaves like what was trained: same prompts, compare logits and greedy tokens.

The reference (the adapter model, or the merged model for GGUF) runs in this process; the export is
reloaded in a *fresh* process (`python -m peftkit.export.verify ...`), exactly as a user would load
it, so nothing cached in memory (tied weights, patched modules, a tokenizer object) can hide a
broken file. The child writes a JSON report; the parent applies the dtype-dependent tolerance.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftkit.errors import ExportError
from peftkit.utils.readable_json import readable_json

DEFAULT_PROMPTS = (
    "What can you help me with?",
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue.",
    "Write a short, friendly greeting for a visitor.",
)
MAX_NEW_TOKENS = 12

# max |logit diff| allowed, relative to max(1, max |reference logit|): 1e-3 catches any real bug in
# float32 (a wrong permutation or scale moves logits by O(1)) while leaving room for summation order.
RELATIVE_TOLERANCE = {
    "float32": 1e-3,
    "float16": 2e-2,  # measured 4.5e-3 on SmolLM2-135M
    "bfloat16": 1e-1,  # 8-bit mantissa: measured 0.042 on SmolLM2-135M, 0.08 on a chaotic tiny model
    "gguf-f32": 1e-3,
    "gguf-f16": 2e-2,
    "gguf-q8_0": 0.3,  # lossy by design: a sanity bound (a broken file is off by ~100%), agreement is reported
    # the file run in llama.cpp (llama_cpp_check): ggml computes GELU from a float16 table (measured 7.6e-4 on a
    # tiny Gemma 3, 1e-6 relative on SiLU models); f16 measured 3.2e-3 on the quickstart model
    "llama.cpp-f32": 3e-3,
    "llama.cpp-f16": 2e-2,
    "llama.cpp-bf16": 1e-1,  # a LoRA on a BF16 base GGUF: llama.cpp rounds the activations to bf16 there
    "llama.cpp-q8_0": 0.3,
    # a quantized merged-model file against the merged model rounded as the file stores it (gguf_writer.round_like_file):
    # llama.cpp also quantizes the activations for those dot products
    "llama.cpp-quantized": 0.3,
    # a GGUF LoRA on the quantized GGUF the base came from: llama.cpp also quantizes the activations there
    # (Q4_1: measured 5.7e-2 and 94 % agreement on the quickstart model; the base alone, 53 %)
    "llama.cpp-quantized-base": 0.3,
}
# teacher-forced greedy-token agreement below this fails (float32 only: half precision may flip near-ties)
MIN_AGREEMENT = {"float32": 0.95, "gguf-f32": 0.95, "llama.cpp-f32": 0.95, "llama.cpp-quantized-base": 0.85,
                 "llama.cpp-quantized": 0.85}


@dataclass
class Reference:
    """Fixed prompts, the reference's greedy continuation of each, and its logits over prompt+continuation."""

    conversations: list[list[dict[str, str]]]
    texts: list[str]
    prompt_ids: list[list[int]]
    continuations: list[list[int]]
    logits: list[torch.Tensor]
    stop_ids: list[int]
    label: str
    data_texts: list[str] = field(default_factory=list)
    """Texts of the run's own data, for a tokenizer comparison beyond the fixed (English) prompts."""
    data_ids: list[list[int]] = field(default_factory=list)
    """Their ids from the original tokenizer."""

    def sequences(self) -> list[list[int]]:
        return [p + c for p, c in zip(self.prompt_ids, self.continuations)]


def conversations_for(system_prompt: str | None, sample_prompts: Sequence[str] = ()) -> list[list[dict[str, str]]]:
    """The fixed prompt set (plus up to two of the recipe's own sample prompts), chat-formatted."""
    from peftkit.data.chat import with_system_prompt

    prompts = list(DEFAULT_PROMPTS) + [p for p in list(sample_prompts)[:2] if p not in DEFAULT_PROMPTS]
    return [with_system_prompt([{"role": "user", "content": p}], system_prompt) for p in prompts]


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    from peftkit.evaluate.generation import stop_token_ids

    return stop_token_ids(model, tokenizer)


@torch.inference_mode()
def _greedy_batch(model: Any, tokenizer: Any, prompts: list[list[int]], stops: list[int], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of all prompts in one left-padded batch (the slow part is per step, not per row)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=stops or None, pad_token_id=pad)
    continuations = []
    for row in out[:, width:].tolist():
        ends = [row.index(t) for t in stops if t in row]
        continuations.append(row[: min(ends) + 1] if ends else row)  # keep the stop token: it is a prediction too
    return continuations


@torch.inference_mode()
def sequence_logits(model: Any, sequences: list[list[int]]) -> list[torch.Tensor]:
    """float32 logits for each sequence, one at a time (no padding to reason about)."""
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([seq], device=device)).logits[0].float().cpu() for seq in sequences]


@torch.inference_mode()
def build_reference(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict[str, str]]],
    *,
    label: str,
    max_new_tokens: int = MAX_NEW_TOKENS,
    data_texts: Sequence[str] = (),
) -> Reference:
    """`data_texts`: texts of the run's own data, whose tokenization the llama.cpp check compares too."""
    from peftkit.data.chat import generation_prompt

    model.eval()
    stops = _stop_ids(model, tokenizer)
    texts = [generation_prompt(tokenizer, c) for c in conversations]
    prompt_ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    continuations = _greedy_batch(model, tokenizer, prompt_ids, stops, max_new_tokens)
    logits = sequence_logits(model, [p + c for p, c in zip(prompt_ids, continuations)])
    data_ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in data_texts]
    return Reference(conversations, texts, prompt_ids, continuations, logits, stops, label, list(data_texts), data_ids)


def max_abs_diff(model: Any, reference: Reference) -> float:
    """Largest |logit| difference between `model` and the reference on the reference's sequences."""
    logits = sequence_logits(model, reference.sequences())
    return float(max((a - b).abs().max() for a, b in zip(logits, reference.logits)))


def compare(reference: Reference, logits: list[torch.Tensor]) -> dict[str, Any]:
    """Numbers for a report: logit diffs and greedy-token agreement along the reference continuations.

    Agreement is teacher-forced: at every position that produced a reference token, does the export's
    argmax equal the reference's? A prompt whose positions all agree would be answered token for token
    the same by free-running greedy decoding (`greedy_exact`), so no slow generation is needed here.
    """
    per_prompt = []
    agree = total = 0
    for i, (ref, out) in enumerate(zip(reference.logits, logits)):
        if ref.shape != out.shape:
            raise ExportError(f"verification: logits of prompt {i} have shape {list(out.shape)}, expected {list(ref.shape)}")
        start = len(reference.prompt_ids[i]) - 1
        stop = start + len(reference.continuations[i])
        hits = (out[start:stop].argmax(-1) == ref[start:stop].argmax(-1)).tolist()
        agree, total = agree + sum(hits), total + len(hits)
        per_prompt.append({
            "prompt": reference.conversations[i][-1]["content"],
            "max_abs_diff": float((ref - out).abs().max()),
            "greedy_agreement": sum(hits) / len(hits) if hits else 1.0,
            "greedy_exact": all(hits),
        })
    return {
        "prompts": len(per_prompt),
        "max_abs_diff": max(p["max_abs_diff"] for p in per_prompt),
        "max_abs_reference_logit": float(max(r.abs().max() for r in reference.logits)),
        "greedy_agreement": agree / total if total else 1.0,
        "greedy_exact": sum(p["greedy_exact"] for p in per_prompt) / len(per_prompt),
        "per_prompt": per_prompt,
    }


def with_logits(reference: Reference, model: Any, label: str) -> Reference:
    """The same prompts and continuations, with `model`'s logits as the reference (e.g. the merged model)."""
    logits = sequence_logits(model, reference.sequences())
    return Reference(reference.conversations, reference.texts, reference.prompt_ids, reference.continuations,
                     logits, reference.stop_ids, label, reference.data_texts, reference.data_ids)


# ---------------------------------------------------------------------------------------------
# Reference files (parent -> child)
# ---------------------------------------------------------------------------------------------


def save_reference(reference: Reference, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"logits_{i}": t.contiguous() for i, t in enumerate(reference.logits)}, str(folder / "logits.safetensors"))
    meta = {
        "conversations": reference.conversations,
        "texts": reference.texts,
        "prompt_ids": reference.prompt_ids,
        "continuations": reference.continuations,
        "stop_ids": reference.stop_ids,
        "label": reference.label,
        "data_texts": reference.data_texts,
        "data_ids": reference.data_ids,
    }
    (folder / "reference.json").write_text(json.dumps(meta), encoding="utf-8")


def load_reference(folder: Path) -> Reference:
    from safetensors.torch import load_file

    meta = json.loads((folder / "reference.json").read_text(encoding="utf-8"))
    tensors = load_file(str(folder / "logits.safetensors"))
    logits = [tensors[f"logits_{i}"] for i in range(len(meta["texts"]))]
    return Reference(meta["conversations"], meta["texts"], meta["prompt_ids"], meta["continuations"], logits,
                     meta["stop_ids"], meta["label"], meta.get("data_texts", []), meta.get("data_ids", []))


# ---------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("PEFTKIT_VERIFY_THREADS", str(torch.get_num_threads()))
    return env


_VERIFY_FOLDER = re.compile(r"peftkit-verify-(?:(\d+)-)?[a-z0-9_]{8}")


def remove_stale_verify_folders() -> None:
    """Remove the reference folders of verifications whose process is gone (`kill -9` runs no cleanup; each holds
    the reference logits), as atomic.py removes dead writers' `.tmp-*` folders; older ones, named without the
    process id, once untouched for a day."""
    from peftkit.utils.atomic import _OLD_STYLE_AGE_S, _age, _alive

    with contextlib.suppress(OSError), os.scandir(tempfile.gettempdir()) as entries:
        for entry in list(entries):
            match = _VERIFY_FOLDER.fullmatch(entry.name)
            if match is None or not entry.is_dir(follow_symlinks=False):
                continue
            pid = match.group(1)
            stale = not _alive(int(pid)) if pid else _age(entry) > _OLD_STYLE_AGE_S
            if stale:
                shutil.rmtree(entry.path, ignore_errors=True)


def _dies_with_parent() -> Callable[[], None] | None:
    """On Linux, have the kernel kill the child when this process dies (even by `kill -9`): a verification child
    left running holds a full copy of the model in memory. Elsewhere, nothing (None)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_death_signal() -> None:  # runs in the child, between fork and exec
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the signal was set
            os._exit(1)

    return set_death_signal


def run_child(kind: str, model_path: Path, reference: Reference, *, gguf_file: str | None = None,
              base: str | None = None, quantization: dict[str, Any] | None = None, allow_pickle: bool = False,
              trust_remote_code: bool = False, lora: Path | None = None, timeout: float = 1800) -> dict[str, Any]:
    """Reload the export in a fresh Python process and return its raw comparison report."""
    from peftkit.export.common import disk_full_as_error

    remove_stale_verify_folders()
    with tempfile.TemporaryDirectory(prefix=f"peftkit-verify-{os.getpid()}-") as tmp:
        folder = Path(tmp)
        with disk_full_as_error(folder, "free some space there, or set TMPDIR to a folder on a disk with room"):
            save_reference(reference, folder / "reference")
        report_path = folder / "report.json"
        cmd = [sys.executable, "-m", "peftkit.export.verify", "--kind", kind, "--model", str(model_path),
               "--reference", str(folder / "reference"), "--report", str(report_path)]
        if gguf_file:
            cmd += ["--gguf-file", gguf_file]
        if base:
            cmd += ["--base", base]
        if quantization:
            cmd += ["--quantization", json.dumps(quantization)]
        if allow_pickle:  # a base with only pickled (.bin) weights, which the recipe opted into (model.allow_pickle)
            cmd += ["--allow-pickle"]
        if trust_remote_code:  # a model with its own code, which the recipe opted into (model.trust_remote_code)
            cmd += ["--trust-remote-code"]
        if lora:  # a GGUF LoRA run on top of the --model GGUF (--kind llama.cpp)
            cmd += ["--lora", str(lora)]
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), timeout=timeout,
                                  preexec_fn=_dies_with_parent())
        except subprocess.TimeoutExpired:
            raise ExportError(f"verification of {model_path} did not finish within {timeout:.0f} s; "
                              "pass --no-verify to skip it") from None
        if proc.returncode != 0 or not report_path.is_file():
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            # llama.cpp logs why a file does not load, well before the Python traceback
            reasons = [line for line in lines[:-15] if "error loading model" in line]
            tail = "\n".join(reasons + lines[-15:])
            raise ExportError(
                f"verification failed: the exported {kind} model at {model_path} could not be loaded and run in a "
                f"fresh process (exit {proc.returncode}):\n{tail}"
            )
        report = json.loads(report_path.read_text(encoding="utf-8"))
    report["child_seconds"] = round(time.perf_counter() - started, 2)
    return report


def judge(report: dict[str, Any], precision: str) -> dict[str, Any]:
    """Add tolerance and pass/fail to a report (does not raise)."""
    scale = max(1.0, report["max_abs_reference_logit"])
    tolerance = RELATIVE_TOLERANCE[precision] * scale
    min_agreement = MIN_AGREEMENT.get(precision)
    failures = []
    if not report["max_abs_diff"] <= tolerance:  # also catches NaN
        failures.append(f"max abs logit diff {report['max_abs_diff']:.3g} > tolerance {tolerance:.3g}")
    if min_agreement is not None and report["greedy_agreement"] < min_agreement:
        failures.append(f"greedy-token agreement {report['greedy_agreement']:.1%} < {min_agreement:.0%}")
    if report.get("tokenizer_match") is False and precision in ("float32", "float16", "bfloat16"):
        failures.append("the exported tokenizer encodes the prompts differently")
    if report.get("template_match") is False and precision in ("float32", "float16", "bfloat16"):
        failures.append("the exported chat template renders the prompts differently")
    return {**report, "precision": precision, "tolerance": tolerance, "min_agreement": min_agreement,
            "passed": not failures, "failures": failures}


def enforce(report: dict[str, Any], what: str) -> None:
    if not report["passed"]:
        raise ExportError(
            f"verification of the {what} failed: " + "; ".join(report["failures"])
            + f" (reference: {report.get('reference')}). The export was not written; pass --no-verify to write it anyway."
        )


def summary_line(report: dict[str, Any]) -> str:
    return (f"max |logit diff| {report['max_abs_diff']:.3g} (tolerance {report['tolerance']:.3g}), "
            f"greedy-token agreement {report['greedy_agreement']:.1%}, "
            f"identical greedy answers {report['greedy_exact']:.0%} of {report['prompts']} prompts")


# ---------------------------------------------------------------------------------------------
# Child side: `python -m peftkit.export.verify`
# ---------------------------------------------------------------------------------------------


def _gguf_config(directory: Path, gguf_file: str) -> Any:
    from peftkit.models.gguf_config import gguf_config

    return gguf_config(directory / gguf_file)


def _apply_gguf_rope(model: Any, path: Path) -> None:
    """transformers' GGUF loader reads neither llama.cpp's `rope_freqs` tensor (Llama 3.1+ RoPE) nor its linear
    `rope.scaling.*` keys: divide the loaded model's rotary frequencies by them, as llama.cpp does, so the check
    compares what llama.cpp will compute from this file."""
    from peftkit.models.gguf_config import gguf_header, rope_freqs

    if "full_attention" in (getattr(model.config, "rope_parameters", None) or {}):
        return  # one RoPE per layer type (Gemma 3): gguf_config put the file's into the config
    metadata, tensor_names = gguf_header(path)
    arch = metadata["general.architecture"]
    divisor: Any = None
    if metadata.get(f"{arch}.rope.scaling.type") == "linear":
        divisor = float(metadata[f"{arch}.rope.scaling.factor"])
    factors = rope_freqs(path, tensor_names)
    if factors is not None:
        divisor = factors
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if divisor is None or rotary is None:
        return
    scaled = rotary.inv_freq / (divisor.to(rotary.inv_freq.device) if torch.is_tensor(divisor) else divisor)
    rotary.inv_freq = scaled
    rotary.original_inv_freq = scaled.clone()


def _load_for_kind(args: argparse.Namespace) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    remote = {"trust_remote_code": True} if args.trust_remote_code else {}
    if args.kind == "hf":
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto", use_safetensors=True, **remote)
        tokenizer = AutoTokenizer.from_pretrained(args.model, **remote)
    elif args.kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(args.model, gguf_file=args.gguf_file, dtype=torch.float32,
                                                     config=_gguf_config(Path(args.model), args.gguf_file))
        _apply_gguf_rope(model, Path(args.model) / args.gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(args.model, gguf_file=args.gguf_file)
    elif args.kind == "peft":
        from peft import PeftModel

        from peftkit.models.load import disable_bnb_cpu_repacking, four_bit_blocksize

        kwargs: dict[str, Any] = {"dtype": torch.float32, "use_safetensors": None if args.allow_pickle else True, **remote}
        blocksize = 64
        if args.quantization:
            from transformers import BitsAndBytesConfig

            q = json.loads(args.quantization)
            blocksize = q.pop("blocksize", 64)
            if q.get("bnb_4bit_compute_dtype"):
                q["bnb_4bit_compute_dtype"] = getattr(torch, q["bnb_4bit_compute_dtype"])
            kwargs["quantization_config"] = BitsAndBytesConfig(**q)
            kwargs["device_map"] = {"": "cpu"}
        with four_bit_blocksize(blocksize):
            base = AutoModelForCausalLM.from_pretrained(args.base, **kwargs)

        disable_bnb_cpu_repacking(base)  # as peftkit loads it: see that function
        model = PeftModel.from_pretrained(base, args.model)
        tok_dir = args.model if (Path(args.model) / "tokenizer_config.json").is_file() else args.base
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, **remote)
    else:  # pragma: no cover - argparse restricts choices
        raise ValueError(args.kind)
    model.eval()
    return model, tokenizer


def _child(args: argparse.Namespace) -> dict[str, Any]:
    from peftkit.data.chat import generation_prompt

    torch.set_num_threads(max(1, int(os.environ.get("PEFTKIT_VERIFY_THREADS", "2"))))
    reference = load_reference(Path(args.reference))
    if args.kind == "llama.cpp":
        from peftkit.export.llama_cpp_check import child_report

        return child_report(args.model, reference, lora=args.lora)
    started = time.perf_counter()
    model, tokenizer = _load_for_kind(args)
    load_seconds = time.perf_counter() - started
    template_ok, tokens_ok = True, True
    for conversation, text, ids in zip(reference.conversations, reference.texts, reference.prompt_ids):
        try:
            rendered = generation_prompt(tokenizer, conversation)
        except Exception:  # noqa: BLE001 - a missing/broken template is a finding, not a crash
            rendered = None
        template_ok &= rendered == text
        tokens_ok &= list(tokenizer(text, add_special_tokens=False)["input_ids"]) == ids
    started = time.perf_counter()
    report = compare(reference, sequence_logits(model, reference.sequences()))
    report["forward_seconds"] = round(time.perf_counter() - started, 2)
    dtype = next(model.parameters()).dtype
    report.update({
        "kind": args.kind,
        "model": args.model,
        "gguf_file": args.gguf_file,
        "loaded_dtype": str(dtype).removeprefix("torch."),
        "reference": reference.label,
        "template_match": template_ok,
        "tokenizer_match": tokens_ok,
        "load_seconds": round(load_seconds, 2),
    })
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftkit.export.verify",
                                     description="Reload an export in this fresh process and compare with a reference.")
    parser.add_argument("--kind", choices=["hf", "gguf", "peft", "llama.cpp"], required=True)
    parser.add_argument("--model", required=True,
                        help="exported model directory (adapter directory for --kind peft, GGUF file for --kind llama.cpp)")
    parser.add_argument("--reference", required=True, help="folder written by save_reference")
    parser.add_argument("--report", required=True, help="where to write the JSON report")
    parser.add_argument("--gguf-file", help="GGUF file name inside --model (--kind gguf)")
    parser.add_argument("--base", help="base model directory (--kind peft)")
    parser.add_argument("--quantization", help="BitsAndBytesConfig kwargs as JSON (--kind peft)")
    parser.add_argument("--allow-pickle", action="store_true", help="the base may load from .bin weights (--kind peft)")
    parser.add_argument("--trust-remote-code", action="store_true", help="the model runs its own code (model.trust_remote_code)")
    parser.add_argument("--lora", help="a GGUF LoRA to apply on top of --model (--kind llama.cpp)")
    args = parser.parse_args(argv)
    report = _child(args)
    Path(args.report).write_text(readable_json(report, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
