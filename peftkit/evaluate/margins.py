"""How confidently the base model gives each correct answer: the forgetting set's near-ties.

A forgetting score counts the general questions the base model answers correctly and the tuned model
does not. Greedy decoding is a step function of the logits: where the base model's correct answer
passes through a near-tie (at some token the runner-up is almost as likely as the token it chose), any
change to the weights, even rounding them to bf16, can flip the answer, and since only correct answers
are counted, such flips can only ever show up as losses. Those questions measure chance, not what
tuning cost.

The *decision margin* of a correct greedy answer is the smallest log-probability lead of the chosen
token over the best other token, over the answer's tokens up to the end of its key fact (what comes
after the fact does not decide the score). A question is *confidently known* when that margin is at
least ln 2: every token that leads to the fact is at least twice as likely as any alternative.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from peftkit.data.build import HeldoutItem
from peftkit.data.facts import matchable, whole_fact_spans
from peftkit.data.chat import generation_prompt
from peftkit.evaluate.generation import Reply
from peftkit.utils.modes import eval_mode

CONFIDENT_MARGIN = math.log(2)
"""Nats: the chosen token at least twice as likely as the runner-up at every step up to the key fact."""


@torch.inference_mode()
def decision_margins(model: Any, tokenizer: Any, items: Sequence[HeldoutItem], replies: Sequence[Reply]) -> list[float | None]:
    """Each reply's decision margin in nats (see the module docstring), teacher-forced along the reply's own
    tokens; None where the reply does not contain its key fact or has no token ids."""
    device = next(model.parameters()).device
    margins: list[float | None] = []
    with eval_mode(model):
        for item, reply in zip(items, replies, strict=True):
            cut = _tokens_to_fact(tokenizer, reply.token_ids, item.key_facts)
            if cut is None:
                margins.append(None)
                continue
            prompt = generation_prompt(tokenizer, item.messages, item.tools)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer = list(reply.token_ids[:cut])
            ids = torch.tensor([prompt_ids + answer], device=device)
            logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : len(prompt_ids) - 1 + cut].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            chosen = torch.tensor(answer, device=device)
            chosen_lp = log_probs.gather(1, chosen[:, None])[:, 0]
            others = log_probs.scatter(1, chosen[:, None], float("-inf"))
            margins.append(float((chosen_lp - others.max(dim=-1).values).min()))
    return margins


def _tokens_to_fact(tokenizer: Any, token_ids: Sequence[int], key_facts: Sequence[str]) -> int | None:
    """The fewest leading tokens whose text holds a key fact where the whole reply states it (a word or number on
    its own: the `4` of `4.` rather than the one in `45`); None when the whole reply lacks one."""
    if not token_ids:
        return None
    reply = matchable(tokenizer.decode(list(token_ids), skip_special_tokens=True))
    spans = whole_fact_spans(reply, key_facts)
    if not spans:
        return None
    # holding one of these spans is monotone in the prefix length (a prefix's text is the reply's start): bisect
    low, high = 1, len(token_ids)
    while low < high:
        middle = (low + high) // 2
        prefix = matchable(tokenizer.decode(list(token_ids[:middle]), skip_special_tokens=True))
        if any(prefix[start:end] == reply[start:end] for start, end in spans):
            high = middle
        else:
            low = middle + 1
    return low


def confidently_known(margins: Sequence[float | None]) -> list[int]:
    """Indices of the questions answered correctly with a decision margin of at least CONFIDENT_MARGIN."""
    return [i for i, margin in enumerate(margins) if margin is not None and margin >= CONFIDENT_MARGIN]
