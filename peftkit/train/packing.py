"""Padding-free batches (`train.packing`): a batch's rows joined into one sequence, attention kept within each row.

transformers recognises rows joined this way from `position_ids` that restart at 0 with no attention mask:
sdpa / eager / flex attention get a block-diagonal causal mask, flash-attention its variable-length kernel. So
the batch trains on exactly its rows and their loss, with no padding token computed at all. Whether a model's
attention honours this is checked once on a tiny input (`packed_rows_stay_separate`), since a model whose code
ignores the restart would silently attend across rows.
"""

from __future__ import annotations

from typing import Any

import torch

from peftkit.data.chat import IGNORE_INDEX
from peftkit.models.skeleton import input_embedding_rows
from peftkit.utils.modes import eval_mode


def flatten_batch(inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(input_ids and position_ids of one row holding the batch's rows back to back, its labels). Padding is
    dropped; each row's first label is ignored, as the shifted loss never trains it (it would be predicted from
    the previous row's last token)."""
    mask = inputs["attention_mask"].bool()
    lengths = mask.sum(dim=1)
    flat_labels = labels[mask].clone()
    starts = torch.cumsum(lengths, dim=0) - lengths
    flat_labels[starts] = IGNORE_INDEX
    positions = torch.arange(int(mask.shape[1]), device=mask.device).expand_as(mask)[mask]
    return {"input_ids": inputs["input_ids"][mask][None], "position_ids": positions[None]}, flat_labels[None]


def packed_rows_stay_separate(model: Any) -> bool:
    """Whether `model` gives a row the same logits alone and joined after another row (no attention across).
    Attention across rows moves the joined row's first logits by a large share of their scale; rounding in
    16-bit weights moves them by well under 3 %."""
    generator = torch.Generator().manual_seed(0)
    vocab_size = input_embedding_rows(model)
    first, second = (torch.randint(3, max(vocab_size, 4), (n,), generator=generator) for n in (5, 7))
    device = next(model.parameters()).device
    positions = torch.cat([torch.arange(5), torch.arange(7)])
    with eval_mode(model), torch.no_grad():
        alone = model(input_ids=second[None].to(device), use_cache=False).logits.float()
        joined = model(input_ids=torch.cat([first, second])[None].to(device), position_ids=positions[None].to(device),
                       use_cache=False).logits.float()[:, 5:]
    dtype = next(model.parameters()).dtype
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    return bool((joined - alone).abs().max() <= tolerance * max(float(alone.abs().max()), 1.0))
