"""Held-out loss and perplexity: token-mean cross-entropy over supervised tokens, full logits."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from peftkit.data.build import PaddingCollator, Row
from peftkit.data.chat import IGNORE_INDEX
from peftkit.utils.modes import eval_mode


@torch.inference_mode()
def mean_loss(model: Any, rows: list[Row], pad_token_id: int, batch_size: int = 8) -> float:
    """The same number for every method and trainer, so runs and benchmarks compare exactly."""
    collate = PaddingCollator(pad_token_id)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[start : start + batch_size]).items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits
            logits = logits[:, logits.shape[1] - labels.shape[1] :]  # drop prompt-tuning virtual tokens
            target = labels[:, 1:]
            mask = target != IGNORE_INDEX
            total += float(F.cross_entropy(logits[:, :-1][mask].float(), target[mask], reduction="sum"))
            count += int(mask.sum())
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
