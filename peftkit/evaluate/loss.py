"""Held-out loss and perplexity: token-mean cross-entropy over supervised tokens, full logits."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from peftkit.data.build import PaddingCollator, Row
from peftkit.data.chat import IGNORE_INDEX
from peftkit.utils.modes import eval_mode
from peftkit.utils.progress import with_progress


@torch.inference_mode()
def mean_loss(model: Any, rows: list[Row], pad_token_id: int, batch_size: int = 8, progress: str | None = None
              ) -> float:
    """The same number for every method and trainer, so runs and benchmarks compare exactly. Rows are batched
    longest first (little padding; a batch too large for memory fails at once), with a progress bar when
    `progress` names it."""
    collate = PaddingCollator(pad_token_id)
    device = next(model.parameters()).device
    by_length = sorted(rows, key=lambda row: -len(row["input_ids"]))
    total, count = 0.0, 0
    with eval_mode(model):
        for start in with_progress(range(0, len(by_length), batch_size), progress or None, "batch"):
            batch = {k: v.to(device) for k, v in collate(by_length[start : start + batch_size]).items()}
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
