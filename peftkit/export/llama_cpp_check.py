"""Run a written GGUF in llama.cpp itself and compare it with the reference, in a fresh process.

The main GGUF check reads the file back with transformers' GGUF loader: a second implementation of the
format, which reads some things llama.cpp does not (and the other way round). llama.cpp is what Ollama,
llama-server and LM Studio run, so when its Python binding is installed (the `llama-cpp` extra)
the export is also run there: the same prompts, logits along the same tokens, and llama.cpp's own
tokenization of the prompt text. This check found a file llama.cpp refused to load that transformers read
without complaint (a GPT-2 pre-tokenizer named `gpt2`; llama.cpp's name is `gpt-2`).

llama.cpp runs in the verification's child process, never in the exporting one: a ggml assertion aborts
the whole process. The KV cache is kept in float32 so only the file's own precision is measured.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftkit.errors import ExportError
from peftkit.export import verify

log = logging.getLogger(__name__)

INSTALL_HINT = ("pip install -c constraints.txt -e '.[llama-cpp]' in peftkit's checkout, with the CMAKE_ARGS the "
                "README gives under Merge and export,")
GGML_TYPE_F32 = 0  # ggml_type: the KV cache in float32
MIN_VERSION = "0.3.36"  # the binding's low-level API this module uses (llama_vocab_is_eog, ...), as tested


def installed_version() -> str | None:
    """llama-cpp-python's version, or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:  # importable but not installed as a distribution (a source checkout)
        return MIN_VERSION


def unavailable() -> str | None:
    """Why the file cannot be run in llama.cpp here, or None when it can."""
    from packaging.version import Version

    found = installed_version()
    if found is None:
        return f"llama-cpp-python is not installed ({INSTALL_HINT} runs the file in llama.cpp itself)"
    if Version(found) < Version(MIN_VERSION):
        return f"llama-cpp-python {found} is older than {MIN_VERSION} (pip install -U llama-cpp-python)"
    return None


def not_run(why: str) -> dict[str, Any]:
    return {"ran": False, "why": why}


QUANTIZED_BASE = "llama.cpp-quantized-base"
"""The precision a GGUF LoRA is judged at on a quantized base file (`verify.RELATIVE_TOLERANCE`)."""


def check(gguf_path: Path, reference: verify.Reference, *, precision: str, lora: Path | None = None) -> dict[str, Any]:
    """Judged report of `gguf_path` (plus a GGUF LoRA) run in llama.cpp; `ran: False` when llama.cpp is not here.

    A written model file llama.cpp cannot run fails the export. With a LoRA, `gguf_path` is the user's base GGUF:
    if llama.cpp cannot run that, the LoRA is not at fault, so it is reported (and warned about), not raised.
    """
    why = unavailable()
    if why:
        return not_run(why)
    try:
        report = verify.run_child("llama.cpp", gguf_path, reference, lora=lora)
    except ExportError as error:
        version = f"llama-cpp-python {installed_version()}"
        if lora is not None:
            reason = f"llama.cpp ({version}) could not run the base GGUF {gguf_path} with this LoRA: {error}"
            log.warning("%s\nThe Modelfile's FROM is that file: check it loads in your llama.cpp / Ollama", reason)
            return not_run(reason)
        raise ExportError(
            f"llama.cpp ({version}) could not run the written GGUF. {error}\nIf this llama.cpp predates the model's "
            "architecture, upgrade it (pip install -U llama-cpp-python); --no-verify writes the file anyway"
        ) from None
    return {"ran": True, **verify.judge(report, precision)}


def summary(report: dict[str, Any]) -> str:
    """One line for the terminal."""
    if not report.get("ran"):
        return f"llama.cpp: not run: {report['why']}"
    line = f"Ran in llama.cpp: {verify.summary_line(report)}"
    if report.get("precision") == QUANTIZED_BASE and report.get("passed"):
        line += ("; on the quantized base GGUF llama.cpp also rounds the activations, so the bound is loose and answers "
                 "may part from `peftkit chat`'s after a few tokens (docs/export.md)")
    if report.get("tokenizer_match") is False:
        line += (f"; llama.cpp tokenizes some prompts differently: from its own tokens, identical greedy answers "
                 f"{report['greedy_exact_own_tokenization']:.0%}")
    if report.get("stops_not_ending_generation"):
        line += f"; llama.cpp does not stop generating on {', '.join(report['stops_not_ending_generation'])}"
    if report.get("data_texts_tokenized_differently"):
        first = " ".join(str(report["data_text_tokenized_differently"]).split())
        line += (f"; llama.cpp splits {report['data_texts_tokenized_differently']} of {report['data_texts_checked']} "
                 f"texts of the run's own data into other tokens than training did (first: {first[:60]!r}), so its "
                 "answers to such text can differ from `peftkit chat`'s")
    return line


# ---------------------------------------------------------------------------------------------
# Child side (`python -m peftkit.export.verify --kind llama.cpp`)
# ---------------------------------------------------------------------------------------------


def child_report(model: str, reference: verify.Reference, lora: str | None = None) -> dict[str, Any]:
    import llama_cpp

    sequences = reference.sequences()
    n_ctx = 2 * max(map(len, sequences)) + 16  # room for prompts llama.cpp splits into more tokens
    threads = max(1, int(os.environ.get("PEFTKIT_VERIFY_THREADS", "2")))
    # verbose: llama.cpp says why a file does not load only in its log, which the parent shows on failure
    llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                          n_threads=threads, n_threads_batch=threads, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                          lora_path=lora, verbose=True)
    logits = []
    for sequence in sequences:
        llm.reset()
        llm.eval(sequence)
        logits.append(torch.from_numpy(np.array(llm.scores[: len(sequence)], dtype=np.float32)))
    own_ids = [_chat_tokens(llm, text) for text in reference.texts]
    tokens_ok = own_ids == reference.prompt_ids
    data_differ = [text for text, ids in zip(reference.data_texts, reference.data_ids)
                   if llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) != ids]
    # where llama.cpp splits a prompt its own way, what it answers from that (the logits above use the reference ids)
    same_answer = [ids == ref or _greedy(llm, ids, len(answer), reference.stop_ids) == answer
                   for ids, ref, answer in zip(own_ids, reference.prompt_ids, reference.continuations)]
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    # the tokens generation stops on (EOS, the template's end of turn) must end generation in llama.cpp too
    not_stopping = [llm.detokenize([t], special=True).decode("utf-8", "replace")
                    for t in reference.stop_ids if not llama_cpp.llama_vocab_is_eog(vocab, t)]
    report = verify.compare(reference, logits)
    report.update({"kind": "llama.cpp", "model": model, "lora": lora, "reference": reference.label,
                   "tokenizer_match": tokens_ok, "stops_not_ending_generation": not_stopping,
                   "data_texts_checked": len(reference.data_texts), "data_texts_tokenized_differently": len(data_differ),
                   "data_text_tokenized_differently": data_differ[0] if data_differ else None,
                   # measured only where llama.cpp splits a prompt its own way (else it is greedy_exact's question)
                   "greedy_exact_own_tokenization": None if tokens_ok else sum(same_answer) / len(same_answer),
                   "llama_cpp_version": installed_version()})
    return report


def _chat_tokens(llm: Any, text: str) -> list[int]:
    """A rendered chat prompt as llama.cpp's chat tokenizes it: with the BOS the file says to add (its
    add_bos_token), the template's own BOS dropped where there is one then (no double BOS)."""
    bos = llm.token_bos()
    bos_text = llm.detokenize([bos], special=True).decode("utf-8", "replace") if bos >= 0 else ""
    template_has_bos = bool(bos_text) and text.startswith(bos_text)
    return llm.tokenize(text.encode("utf-8"), add_bos=not template_has_bos, special=True)


def _greedy(llm: Any, prompt: list[int], max_new_tokens: int, stops: list[int]) -> list[int]:
    """llama.cpp's greedy continuation of `prompt` (the stop token included, as in the reference)."""
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    while len(out) < max_new_tokens:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token in stops:
            break
        llm.eval([token])
    return out
