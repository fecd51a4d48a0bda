"""Batched greedy generation and the held-out fact-accuracy score."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peftkit.data.build import HeldoutItem
from peftkit.data.chat import generation_prompt
from peftkit.data.formats import Message
from peftkit.utils.modes import eval_mode


@dataclass(frozen=True)
class Reply:
    text: str
    finished: bool
    """True when the model ended the turn itself (emitted an end-of-turn token)."""


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.inference_mode()
def greedy_continuations(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    stops: Sequence[int],
    pad_token_id: int,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: str | None = None,
) -> list[tuple[list[int], bool]]:
    """Greedy continuation token ids of each prompt (ending with the stop token when the model emitted one)
    and whether it finished; batched with left padding, longest prompts first to bound padding."""
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    device = next(model.parameters()).device
    results: dict[int, tuple[list[int], bool]] = {}
    starts: Any = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=progress, unit="batch", leave=False)
    with eval_mode(model):
        for start in starts:
            ids = order[start : start + batch_size]
            width = max(len(prompt_ids[i]) for i in ids)
            input_ids = [[pad_token_id] * (width - len(prompt_ids[i])) + list(prompt_ids[i]) for i in ids]
            mask = [[0] * (width - len(prompt_ids[i])) + [1] * len(prompt_ids[i]) for i in ids]
            out = model.generate(
                input_ids=torch.tensor(input_ids, device=device),
                attention_mask=torch.tensor(mask, device=device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=list(stops),
                pad_token_id=pad_token_id,
            )
            for row, index in zip(out[:, width:].tolist(), ids):
                ends = [row.index(t) for t in stops if t in row]
                results[index] = (row[: min(ends) + 1], True) if ends else (row, False)
    return [results[i] for i in range(len(prompt_ids))]


def generate_replies(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: str | None = None,
) -> list[Reply]:
    """Greedy replies to chat conversations (see `greedy_continuations`)."""
    prompts = [tokenizer(generation_prompt(tokenizer, c), add_special_tokens=False)["input_ids"] for c in conversations]
    stops = stop_token_ids(model, tokenizer)
    continuations = greedy_continuations(model, prompts, stops=stops, pad_token_id=tokenizer.pad_token_id,
                                         max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    return [Reply(tokenizer.decode(ids[:-1] if finished else ids, skip_special_tokens=True).strip(), finished)
            for ids, finished in continuations]


def is_correct(reply: str, key_facts: Sequence[str]) -> bool:
    text = reply.lower()
    return any(fact.lower() in text for fact in key_facts)


def heldout_accuracy(
    model: Any, tokenizer: Any, items: Sequence[HeldoutItem], *, max_new_tokens: int = 64, batch_size: int = 16,
    label: str = "held-out questions",
) -> tuple[float, list[dict[str, Any]]]:
    """Share of questions whose greedy reply contains the key fact, and the per-item record.

    `label` names the question set on the progress bar (held-out facts, the general set, ...)."""
    replies = generate_replies(
        model,
        tokenizer,
        [item.messages for item in items],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=f"{label} ({len(items)})",
    )
    details = [
        {
            "question": item.messages[-1]["content"],
            "key_fact": list(item.key_facts),
            "reply": reply.text,
            "correct": is_correct(reply.text, item.key_facts),
            "finished": reply.finished,
        }
        for item, reply in zip(items, replies)
    ]
    accuracy = sum(d["correct"] for d in details) / max(len(details), 1)
    return accuracy, details
