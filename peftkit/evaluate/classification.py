"""Classification scores: accuracy and macro-F1 (the mean of per-label F1, so rare labels count)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], num_labels: int) -> dict[str, float]:
    pred = np.asarray(predictions)
    gold = np.asarray(labels)
    if len(gold) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    f1s = []
    for label in range(num_labels):
        tp = int(np.sum((pred == label) & (gold == label)))
        fp = int(np.sum((pred == label) & (gold != label)))
        fn = int(np.sum((pred != label) & (gold == label)))
        if tp + fp + fn == 0:
            continue  # label absent from both: it does not count towards the macro average
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(pred == gold)), "macro_f1": float(np.mean(f1s)) if f1s else 0.0}


def metrics_from_eval_prediction(num_labels: int) -> Any:
    """A Trainer `compute_metrics` function over argmax predictions."""

    def compute(eval_prediction: Any) -> dict[str, float]:
        logits = eval_prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        return classification_metrics(np.argmax(logits, axis=-1).tolist(), np.asarray(eval_prediction.label_ids).tolist(), num_labels)

    return compute
