"""Quantization-error recovery: a QLoRA adapter also learns the full-precision base's predictions.

A 4-bit grid moves a small model's next-token distribution a long way (SmolLM2-135M under nf4:
0.71 nats per token before any training, `benchmarks/results/*_quant_error.md`). An adapter
trained on the answers alone learns the domain facts on top of a model that reads the questions
worse than the full-precision one did. With `quantization.recover`, the full-precision base runs
once over the training rows *before* the quantized model is loaded, and its top-k next-token
distribution is kept at every prompt position (system prompt, user turns, template tokens: the
positions whose next token is not supervised). The trainer adds the KL divergence from that
distribution at those positions to the answer loss, so the adapter also undoes the quantization
error on exactly the kind of text the model will be asked (distillation from the unquantized
teacher, as in accuracy-recovery adapters). Answers keep their hard labels: the base does not know
the domain facts. Eval rows get no targets, so the eval loss stays the plain answer loss.
"""

from __future__ import annotations

from typing import Any

import torch

from peftkit.data.build import PaddingCollator, Row
from peftkit.data.chat import IGNORE_INDEX
from peftkit.utils.modes import eval_mode

RECOVERY_MASK = "recovery_mask"
RECOVERY_IDS = "recovery_ids"
RECOVERY_PROBS = "recovery_probs"
RECOVERY_KEYS = (RECOVERY_MASK, RECOVERY_IDS, RECOVERY_PROBS)
TOP_K = 20


def prompt_positions(labels: list[int] | torch.Tensor) -> torch.Tensor:
    """Positions p (0 <= p < len - 1) whose next token is in the row but not supervised."""
    labels = torch.as_tensor(labels)
    return (labels[1:] == IGNORE_INDEX).nonzero().flatten()


@torch.inference_mode()
def add_recovery_targets(model: Any, pad_token_id: int, rows: list[Row], top_k: int = TOP_K,
                         batch_size: int = 4) -> list[Row]:
    """`rows` with `model`'s top-k next-token distribution at each prompt position (compact tensors:
    int32 token ids, float16 probabilities renormalised over the k)."""
    collate = PaddingCollator(pad_token_id)
    device = next(model.parameters()).device
    out: list[Row] = []
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            chunk = [{k: row[k] for k in ("input_ids", "labels")} for row in rows[start : start + batch_size]]
            batch = {k: v.to(device) for k, v in collate(chunk).items()}
            batch.pop("labels")
            logits = model(**batch, use_cache=False).logits
            for index, row in enumerate(rows[start : start + batch_size]):
                positions = prompt_positions(row["labels"]).to(device)
                top = torch.log_softmax(logits[index, positions].float(), dim=-1).topk(top_k, dim=-1)
                probs = top.values.exp()
                probs = probs / probs.sum(dim=-1, keepdim=True)
                out.append({**row, RECOVERY_IDS: top.indices.to(torch.int32).cpu(),
                            RECOVERY_PROBS: probs.to(torch.float16).cpu()})
    return out


def recovery_batch(rows: list[Row], length: int) -> dict[str, torch.Tensor]:
    """The collated targets: a (batch, length) mask of the positions that have them, and their
    ids / probabilities in the mask's row-major order. Rows without targets contribute none."""
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    ids, probs = [], []
    for index, row in enumerate(rows):
        if RECOVERY_IDS in row:
            mask[index, prompt_positions(row["labels"])] = True
            ids.append(row[RECOVERY_IDS])
            probs.append(row[RECOVERY_PROBS])
    return {RECOVERY_MASK: mask, RECOVERY_IDS: torch.cat(ids).long(), RECOVERY_PROBS: torch.cat(probs).float()}


def recovery_kl_sum(logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Sum over positions of KL(teacher top-k || student), the student's probabilities taken over the
    whole vocabulary (mass it puts outside the teacher's top-k counts against it)."""
    log_q = torch.log_softmax(logits.float(), dim=-1).gather(1, ids)
    return (probs * (probs.clamp_min(1e-12).log() - log_q)).sum()
