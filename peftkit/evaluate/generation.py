"""Batched greedy generation and the held-out fact-accuracy score."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peftkit.data.build import HeldoutItem
from peftkit.data.facts import whole_fact_spans
from peftkit.data.chat import Tools, generation_prompt
from peftkit.data.formats import Message
from peftkit.errors import PeftkitError
from peftkit.models.skeleton import active_peft_config, learned_position_limit
from peftkit.utils.modes import eval_mode, padding_side
from peftkit.utils.progress import with_progress


@dataclass(frozen=True)
class Reply:
    text: str
    finished: bool
    """True when the model ended the turn itself (emitted an end-of-turn token)."""
    token_ids: tuple[int, ...] = ()
    """The generated tokens before the end of turn, for measurements that need the exact greedy path."""


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The generation config's EOS ids, the tokenizer's EOS and the chat template's end-of-turn token."""
    from peftkit.data.chat import end_of_turn_token_id

    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    for extra in (tokenizer.eos_token_id, end_of_turn_token_id(tokenizer)):
        if extra is not None and extra not in ids:
            ids.append(extra)
    return ids


@torch.inference_mode()
def generate_replies(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: str | None = None,
    tools: Sequence[Tools] | None = None,
) -> list[Reply]:
    """Greedy replies, batched with left padding; longest prompts first to bound padding. `tools`: each
    conversation's function schemas, if any."""
    tools = tools or [None] * len(conversations)
    prompts = [generation_prompt(tokenizer, c, t) for c, t in zip(conversations, tools)]
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    stops = stop_token_ids(model, tokenizer)
    positions = text_position_limit(model)
    device = next(model.parameters()).device
    replies: dict[int, Reply] = {}
    with padding_side(tokenizer, "left"), eval_mode(model):
        for start in with_progress(range(0, len(order), batch_size), progress or None, "batch"):
            ids = order[start : start + batch_size]
            batch = tokenizer([prompts[i] for i in ids], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model.generate(
                **batch,
                max_new_tokens=room_to_answer(batch["input_ids"].shape[1], max_new_tokens, positions),
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            for row, index in zip(new_tokens.tolist(), ids):
                finished = any(t in stops for t in row)
                if finished:
                    row = row[: min(row.index(t) for t in stops if t in row)]
                text = tokenizer.decode(row, skip_special_tokens=True)
                if not finished:  # cut by max_new_tokens, maybe inside a character of several tokens (an emoji)
                    text = text.rstrip(INCOMPLETE)
                replies[index] = Reply(text.strip(), finished, tuple(row))
    return [replies[i] for i in range(len(prompts))]


INCOMPLETE = "\ufffd"
"""What a tokenizer decodes the first bytes of an unfinished character to."""


def text_position_limit(model: Any) -> int | None:
    """`learned_position_limit` less the positions a prompt-learning adapter takes before the text: prompt tuning's
    soft prompt is part of the sequence, and prefix tuning's cached prefix shifts the text's position ids by its
    length. Past it, generation indexes beyond the position table (an IndexError deep inside the model)."""
    limit = learned_position_limit(model)
    config = active_peft_config(model)
    if limit is None or not getattr(config, "is_prompt_learning", False):
        return limit
    return limit - int(config.num_virtual_tokens)


def room_to_answer(prompt_tokens: int, max_new_tokens: int, positions: int | None) -> int:
    """New tokens that still fit a model with a learned position table of `positions` (GPT-2, OPT): its
    `text_position_limit`."""
    if positions is None:
        return max_new_tokens
    if prompt_tokens >= positions:
        raise PeftkitError(f"a prompt of {prompt_tokens} tokens fills all {positions} positions this model has for text "
                           "(learned position embeddings, less a prompt-learning adapter's virtual tokens): no room to "
                           "answer; shorten the prompt (the question, the system prompt or the turns before it)")
    return min(max_new_tokens, positions - prompt_tokens)


def is_correct(reply: str, key_facts: str | Sequence[str]) -> bool:
    """Whether the reply states a key fact (`matchable` forms) as a whole word or number: `4` is not found in
    `14` or `4.5`, `Tunis` not in `Tunisia`, `$14` not in `$140`; `Paris.`, `(4)` and `4,` are found. Text in
    scripts written without spaces (Chinese, Japanese, Korean particles, Thai, ...) needs no boundary.
    A lone string is one fact, not a list of characters."""
    return bool(whole_fact_spans(reply, key_facts))


def heldout_accuracy(
    model: Any, tokenizer: Any, items: Sequence[HeldoutItem], *, max_new_tokens: int = 64, batch_size: int = 16,
    label: str = "held-out questions",
) -> tuple[float, list[dict[str, Any]]]:
    """Share of questions whose greedy reply contains the key fact, and the per-item record.

    `label` names the question set on the progress bar (held-out facts, the general set, ...)."""
    replies = answer_items(model, tokenizer, items, max_new_tokens=max_new_tokens, batch_size=batch_size, label=label)
    return score_replies(items, replies)


def answer_items(
    model: Any, tokenizer: Any, items: Sequence[HeldoutItem], *, max_new_tokens: int = 64, batch_size: int = 16,
    label: str = "held-out questions",
) -> list[Reply]:
    """Greedy replies to question items (each with its own tools, if any), with a progress bar named `label`."""
    return generate_replies(
        model,
        tokenizer,
        [item.messages for item in items],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=f"{label} ({len(items)})",
        tools=[item.tools for item in items],
    )


def score_replies(items: Sequence[HeldoutItem], replies: Sequence[Reply]) -> tuple[float, list[dict[str, Any]]]:
    """Share of `replies` that contain their item's key fact, and the per-item record."""
    details = [
        {
            "question": item.question,
            "key_fact": list(item.key_facts),
            "reply": reply.text,
            "correct": is_correct(reply.text, item.key_facts),
            "finished": reply.finished,
        }
        for item, reply in zip(items, replies, strict=True)
    ]
    accuracy = sum(d["correct"] for d in details) / max(len(details), 1)
    return accuracy, details
