"""From a recipe's `data:` section to tokenized train/eval rows and held-out questions."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftkit.config.schema import DataConfig
from peftkit.data.chat import (IGNORE_INDEX, abridged, replies_cut_off, special_tokens_pattern, tokenize_conversation_rows,
                               tokenize_text_rows, trained_count, trained_flags, with_system_prompt)
from peftkit.data.columns import ROLE_ALIASES, detected_pair, number_as_text
from peftkit.data.facts import whole_fact_spans
from peftkit.data.files import data_sources, read_records
from peftkit.data.formats import (Example, Message, bad_records_error, chat_record_messages, detect_format,
                                  load_examples, message_calls, message_text, record_tools, sharegpt_messages,
                                  tool_calls_of, with_folded_keys, with_record_system)
from peftkit.data.replay import BUILTIN_PREFIX, ReplayAnswerer, load_replay, sample_replay
from peftkit.errors import DataError
from peftkit.utils.progress import with_progress
from peftkit.utils.once import say_once

log = logging.getLogger(__name__)

Row = dict[str, list[int]]


@dataclass(frozen=True)
class HeldoutItem:
    messages: tuple[Message, ...]
    """The prompt: optional system turn and the user question."""
    key_facts: tuple[str, ...]
    """Accepted answers: the reply is correct if it contains any of them (`matchable` forms)."""
    tools: tuple[dict[str, Any], ...] | None = None
    """Function schemas shown to the model (a tool-use question: the key fact can be the function's name)."""

    @property
    def question(self) -> str:
        """The last user message (a conversation may end with a tool's result instead)."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), self.messages[-1]["content"])


@dataclass
class DataBundle:
    train: list[Row]
    eval: list[Row]
    heldout: list[HeldoutItem]
    stats: dict[str, Any] = field(default_factory=dict)
    split_fingerprint: str = ""
    """Which examples went to training and which to evaluation (`split_fingerprint`)."""


def heldout_fingerprint(items: list[HeldoutItem]) -> str:
    """A hash of the held-out items as asked: every turn, the key facts and the tools (a resumed run compares it
    with the one its before / after comparison was measured on; the questions alone miss an edited earlier turn)."""
    asked = [[list(item.messages), list(item.key_facts), item.tools] for item in items]
    return hashlib.sha256(json.dumps(asked, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def split_fingerprint(train: list[Example], eval: list[Example]) -> str:
    """A hash of the examples on each side of the train / eval split, by content (not where they were read, nor
    how they tokenize): it changes when a data file is edited or added to, not with a chat template that writes
    today's date or a change in how text is tokenized. `peftkit eval` and `--resume` compare it with the run's."""
    digest = hashlib.sha256()
    for examples in (train, eval):
        digest.update(b"|")
        for example in examples:
            digest.update(json.dumps([example.messages, example.text, example.tools], sort_keys=True,
                                     ensure_ascii=False, default=str).encode())
    return digest.hexdigest()


PROGRESS_FROM = 2000
"""Examples from which tokenizing shows a progress bar (about a millisecond each: 100,000 rows take minutes)."""


def _tokenizing_progress(examples: list[Example], what: str | None) -> Iterable[Example]:
    from peftkit.train.launch import is_main_process

    shown = what is not None and len(examples) >= PROGRESS_FROM and is_main_process()  # every rank tokenizes
    return with_progress(examples, f"tokenizing {what}s" if shown else None, (what or "").rsplit(" ", 1)[-1])


def _written_token_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """The special tokens' texts, and the end-of-turn token's where it is an added token not marked special (a
    ChatML-style `<|eot|>` added with `special=False`): written in data, each is read as the token itself."""
    from peftkit.data.chat import end_of_turn_token_id

    pattern = special_tokens_pattern(tokenizer)
    end = end_of_turn_token_id(tokenizer)
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    end_text = added[end].content if end in added and not getattr(added[end], "special", False) else None
    if not end_text or (pattern is not None and pattern.fullmatch(end_text)):
        return pattern
    return re.compile("|".join([re.escape(end_text), *([pattern.pattern] if pattern is not None else [])]))


def tokenize_examples(
    examples: list[Example], tokenizer: Any, max_seq_len: int, system_prompt: str | None, *, train_on_prompt: bool = False,
    what: str | None = "example", refused_when_empty: bool = False,
) -> tuple[list[Row], dict[str, int]]:
    """Token ids and labels; `train_on_prompt` supervises every token of a conversation, not only its replies.
    Plain text longer than `max_seq_len` is split into rows of `max_seq_len` tokens (`split`: how many texts,
    `split_rows`: the rows they made). Truncated, split and dropped examples are logged as `what` ("training
    example", ...; None: not logged). `refused_when_empty`: the caller refuses the examples when no row is left, in
    one message: then nothing is logged before it."""
    rows: list[Row] = []
    truncated = dropped = split = split_rows = replies_lost = 0
    truncated_at: list[str] = []  # where the truncated examples, and those that lost whole replies, were read
    lost_at: list[str] = []
    specials = _written_token_pattern(tokenizer)
    written_specials: dict[str, str] = {}  # token text -> the first place it was written in the data
    dropped_at: list[str] = []
    for example in _tokenizing_progress(examples, what):
        texts = [example.text or ""] if example.messages is None else [str(m.get("content") or "") for m in example.messages]
        for token in {found for text in texts for found in specials.findall(text)} if specials else ():
            written_specials.setdefault(token, example.where)
        if example.messages is not None:
            messages = with_system_prompt(example.messages, system_prompt)
            example_rows, cut = tokenize_conversation_rows(
                tokenizer, messages, max_seq_len, example.where, example.tools, train_on_prompt=train_on_prompt
            )
            counted = example_rows
            if cut and train_on_prompt:  # every token is trained there: count the replies in rows labelled as usual
                counted, _ = tokenize_conversation_rows(tokenizer, messages, max_seq_len, example.where, example.tools)
            lost = 0
            if cut and any(m.get("train_detail") for m in messages):
                lost = replies_cut_off(tokenizer, messages, max_seq_len, example.where, example.tools)
            elif cut:
                lost = _replies_lost(messages, counted)
            if lost:
                replies_lost += lost
                lost_at.append(example.where)
        else:
            example_rows, cut = tokenize_text_rows(tokenizer, example.text or "", max_seq_len), 0
            if len(example_rows) > 1:
                split, split_rows = split + 1, split_rows + len(example_rows)
        truncated += cut
        if cut:
            truncated_at.append(example.where)
        kept = [row for row in example_rows if trained_count(row["labels"])]
        dropped += len(example_rows) - len(kept)
        if len(kept) < len(example_rows):
            dropped_at.append(example.where)
        rows.extend(kept)
    what = "" if refused_when_empty and not rows else what
    if written_specials and what:
        named = ", ".join(f"{token!r} ({where})" for token, where in list(written_specials.items())[:3])
        log.warning("the %ss contain the text of special tokens, which the tokenizer reads as the tokens themselves "
                    "(a reply can learn to end halfway): %s. Rewrite those passages (HTML's `<s>` can be `<del>`)",
                    what, named)
    if truncated and what:
        used = "scored" if what.startswith(("eval", "general")) else "trained"  # measured, not learnt
        lost_note = (f"; {len(lost_at)} of them lost {replies_lost} later assistant repl{'y' if replies_lost == 1 else 'ies'} "
                     f"entirely, past the limit (first: {lost_at[0]}), which are not {used} at all: raise "
                     "data.max_seq_len or split those conversations" if lost_at else "")
        log.warning("%d %s(s) were longer than data.max_seq_len=%d tokens and were truncated, the text past the "
                    "limit not %s (first: %s)%s", truncated, what, max_seq_len, used, truncated_at[0], lost_note)
    if split and what:
        log.info("%d plain-text %s(s) longer than data.max_seq_len=%d tokens were split into %d rows of up to %d "
                 "tokens, each trained whole", split, what, max_seq_len, split_rows, max_seq_len)
    if dropped and what:  # (a conversation ending in a user turn is the recipe check's warning: config/validate.py)
        log.warning("%d %s row(s) had no token left to train and were skipped (first: %s): a reply that starts past "
                    "data.max_seq_len=%d, replies all of weight 0, or a text of one token", dropped, what,
                    dropped_at[0], max_seq_len)
    return rows, {"examples": len(examples), "truncated": truncated, "dropped": dropped, "split": split,
                  "split_rows": split_rows, "replies_lost": replies_lost}


def _replies_lost(messages: list[Message], rows: list[Row]) -> int:
    """Trained assistant replies of a truncated conversation that fall wholly past `max_seq_len` in its one row:
    each kept reply is one run of trained tokens (the turns between are not trained). A row of its own per reply
    (templates that rewrite history) that lost its reply is dropped, and counted there instead."""
    if len(rows) != 1 or all(label == IGNORE_INDEX for label in rows[0]["labels"]):
        return 0
    labels = rows[0]["labels"]
    runs = sum(label != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX) for i, label in enumerate(labels))
    trained = sum(m["role"] == "assistant" and m.get("weight", 1) != 0 for m in messages)
    return max(0, trained - runs)


_WARNED_GIVEN_AWAY: set[str] = set()


def _heldout_messages(record: dict[str, Any], where: str, what: str) -> list[Message]:
    """A held-out prompt read as training reads chat data (`human` / `gpt` roles, ShareGPT's `from` / `value` under
    `messages`, a record-level `system`): a question must reach the model as the training conversations did."""
    if isinstance(record.get("question"), str):
        if not record["question"].strip():
            raise DataError(f"{where}: the {what} question is empty; write the question the model is to answer")
        return with_record_system([{"role": "user", "content": record["question"]}], record)
    sharegpt = not isinstance(record.get("messages"), list) and detect_format(record) == "sharegpt"
    if not sharegpt and (not isinstance(record.get("messages"), list) or not record["messages"]):
        raise DataError(f"{where}: {what} record needs a `question` string or a non-empty `messages` (or ShareGPT "
                        "`conversations`) list")
    turns = sharegpt_messages(record, where) if sharegpt else chat_record_messages(record, where)
    messages = []
    for n, message in enumerate(turns, start=1):
        here = f"{where}: message {n}"
        calls = message_calls(message, here)
        if not isinstance(message, dict) or "role" not in message or ("content" not in message and not calls):
            raise DataError(f"{here} must be an object with `role` and `content` (or ShareGPT's `from` and `value`), "
                            f"got {json.dumps(message, ensure_ascii=False, default=str)[:80]}")
        role = ROLE_ALIASES.get(str(message["role"]).lower())
        if role is None or str(message["role"]).lower() == "function_call":
            raise DataError(f"{here} has unknown role {message['role']!r}; use one of system, user, assistant, tool")
        content = "" if message.get("content") is None and calls else message_text(message.get("content"), here)
        entry: Message = {k: v for k, v in message.items() if k != "function_call"} | {"role": role, "content": content}
        if calls:
            entry["tool_calls"] = tool_calls_of(calls, here)
        messages.append(entry)
    if messages[-1]["role"] not in ("user", "tool"):  # a chat record reused as a question still holds its answer
        raise DataError(f"{where}: this {what} conversation ends with a{'n' * (messages[-1]['role'] == 'assistant')} "
                        f"{messages[-1]['role']} turn, so the model would be shown the answer it is scored on; end it "
                        "with the user's question (or a tool's result): drop the reply, `key_fact` says what it must "
                        "contain")
    return messages


def _heldout_item(record: Any, where: str, what: str, system_prompt: str | None) -> HeldoutItem:
    """One held-out record (`Question`, `Key_Fact` already folded as spreadsheets write them) as a question and the
    key facts its answer must contain."""
    if not isinstance(record, dict) or "key_fact" not in record:
        fields = f" (this one: {', '.join(map(str, record))})" if isinstance(record, dict) else ""
        kind, pair = detect_format(record), detected_pair(record) if isinstance(record, dict) else None
        hint = (f"; if `{pair[1]}` is the fact a reply must contain, name it `key_fact`" if kind == "pair" and pair else
                f"; it is a training record ({kind} format): training data goes in data.train (`peftkit eval --data "
                "FILE` measures the loss on such a file), a held-out file holds `{\"question\": ..., \"key_fact\": "
                "...}` records" if kind not in (None, "text", "pair") else "")
        raise DataError(f"{where}: {what} records need `question` (or `messages`) and `key_fact`{fields}{hint}")
    facts = record["key_fact"]
    facts = [number_as_text(f) for f in (facts if isinstance(facts, list) else [facts])]  # `4` matched as written
    if not facts or not all(isinstance(f, str) and f.strip() for f in facts):
        raise DataError(f"{where}: `key_fact` must be a non-empty string or a list of strings")
    messages = _heldout_messages(record, where, what)
    return HeldoutItem(tuple(with_system_prompt(messages, system_prompt)), tuple(f.strip() for f in facts),
                       record_tools(record, where))


def load_heldout(path: str | Path, system_prompt: str | None, *, warn_given_away: bool = True,
                 what: str = "held-out") -> list[HeldoutItem]:
    """Questions and key facts. `warn_given_away`: warn (once per file) about questions that contain their own key
    fact. `what` names the set in messages (`held-out`, `general-set`)."""
    items = []
    given_away = []  # questions that contain their own key fact: an echo of the question would score
    problems: list[tuple[str, str]] = []  # all of them in one message, as for training data
    for where, record in read_records(Path(path)):
        try:
            item = _heldout_item(with_folded_keys(record), where, what, system_prompt)
        except DataError as exc:
            problems.append((where, str(exc)))
            continue
        if item.tools is None and whole_fact_spans(item.question, item.key_facts):  # one fact of a list scores
            given_away.append(where)
        items.append(item)
    if problems:
        raise bad_records_error(path, problems, len(items))
    if not items:
        raise DataError(f"{what} file {path} contains no questions")
    if given_away and warn_given_away and str(path) not in _WARNED_GIVEN_AWAY:
        _WARNED_GIVEN_AWAY.add(str(path))
        log.warning("%d %s question(s) contain their own key fact (first: %s): a reply that repeats the "
                    "question scores as correct; reword the question or choose a key fact it does not give away",
                    len(given_away), what, given_away[0])
    return items


def content_key(item: Any) -> str:
    """What a record says, without where it was read (or the format it was read as): copies share it."""
    fields = {k: v for k, v in vars(item).items() if k not in ("where", "format")}
    return json.dumps(fields, sort_keys=True, ensure_ascii=False, default=str)


LARGE_EVAL_SPLIT = 1000
"""Eval-split examples above which a split without `data.max_eval_examples` is warned about."""


def split_train_eval(examples: list[Example], fraction: float, seed: int, max_eval: int | None = None
                     ) -> tuple[list[Example], list[Example]]:
    """A deterministic split: the same seed and file always give the same eval set, of round(fraction * n)
    examples (at most `max_eval`). Copies of one record stay on one side (an eval row that training saw measures memorisation), so
    with duplicates the eval set's size can differ a little; without them it is the plain shuffled split."""
    if fraction <= 0:
        return examples, []
    if len(examples) < 2:  # training keeps the one example; said, or "eval loss n/a" would have no reason given
        say_once(log, logging.WARNING, f"No eval split: the training data holds {len(examples)} example "
                 f"(data.eval_fraction {fraction:g} needs two or more, one left to train on), so there is no eval "
                 "loss and no early stopping; give eval examples in their own file (data.eval) to measure one")
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(examples) * fraction))
    if max_eval is not None and n_eval > max_eval:
        log.info("The eval split holds %d of the %d examples (data.max_eval_examples; eval_fraction %g would "
                 "hold %d)", max_eval, len(examples), fraction, n_eval)
        n_eval = max_eval
    elif max_eval is None and n_eval > LARGE_EVAL_SPLIT:
        log.warning("The eval split holds %d examples (data.eval_fraction %g of %d), all evaluated at every evaluation, "
                    "which on data this size can take longer than training: set data.max_eval_examples (e.g. %d) or "
                    "a lower eval_fraction", n_eval, fraction, len(examples), LARGE_EVAL_SPLIT)
    if n_eval >= len(examples):
        raise DataError(f"data.eval_fraction={fraction} of {len(examples)} examples leaves none to train on; "
                        "lower it, or give the eval examples in their own file (data.eval)")
    if n_eval > 2 * fraction * len(examples):  # at least one: on a few examples that is far more than asked
        share = 100 * n_eval / len(examples)
        say_once(log, logging.WARNING, f"The eval split holds {n_eval} of the {len(examples)} examples ({share:.0f} %; "
                 f"data.eval_fraction is {fraction:g}): on data this small that is taken from training; set "
                 "data.eval_fraction: 0 to train on all of them, or give eval examples in their own file (data.eval)",
                 key=examples[0].where)
    keys = [content_key(example) for example in examples]
    copies: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        copies.setdefault(key, []).append(i)
    groups = [copies[keys[i]] for i in order]  # each example's copies, in shuffled order
    eval_ids: set[int] = set()
    for group in groups:  # whole groups, as long as they fit
        if group[0] not in eval_ids and len(eval_ids) + len(group) <= n_eval:
            eval_ids.update(group)
    if not eval_ids:  # every record has more copies than the eval set holds: the smallest group, if near the size
        smallest = min(groups, key=len)
        fits = len(smallest) <= 2 * n_eval and len(smallest) < len(examples)
        eval_ids = set(smallest) if fits else set(order[:n_eval])  # else copies on both sides (warned about)
    return [e for i, e in enumerate(examples) if i not in eval_ids], [e for i, e in enumerate(examples) if i in eval_ids]


def warn_duplicates(read: list[Any], train: list[Any], held_out: list[Any], *, split: bool = False) -> None:
    """Warn (once per message) about exact copies among the training records `read` (before any eval split), and
    about eval records that `train` also has: their eval loss measures memorisation, and early stopping follows it.
    `split`: the eval records were split off `read` (split_train_eval put copies on both sides only where every
    record has more copies than the split holds), so there is no eval file to remove them from."""
    first_seen: dict[str, Any] = {}
    repeats = []  # (copy, original) locations
    for item in read:
        original = first_seen.setdefault(content_key(item), item)
        if original is not item:
            repeats.append((item.where, original.where))
    train_keys = {content_key(item) for item in train}
    seen = [item.where for item in held_out if content_key(item) in train_keys]
    messages = []
    if repeats:
        messages.append(f"training examples that repeat an earlier one exactly: {len(repeats)} of {len(read)} (first: "
                        f"{repeats[0][0]} repeats {repeats[0][1]}); a copy is trained on once more each epoch, so drop "
                        "the copies unless that weighting is meant")
    if seen and split:
        messages.append(f"eval split examples that also occur in the training data: {len(seen)} of {len(held_out)} "
                        f"(first: {seen[0]}): each record has more copies than the eval split holds, so copies went to "
                        "both sides, and their eval loss measures memorisation, not how the model does on new data; "
                        "drop the copies from the training data, raise data.eval_fraction, or give eval examples in "
                        "their own file (data.eval)")
    elif seen:
        messages.append(f"eval examples that also occur in the training data: {len(seen)} of {len(held_out)} (first: "
                        f"{seen[0]}); their eval loss measures memorisation, not how the model does on new data, so "
                        "remove them from one of the two")
    for message in messages:
        say_once(log, logging.WARNING, message)


def warn_heldout_in_training(heldout: list[HeldoutItem], train: list[Example]) -> None:
    """Warn (once per message) about held-out questions that a training conversation asks word for word: the
    model was trained on their answers, so held-out accuracy measures memorisation, not what it learned."""
    asked = {" ".join(str(m.get("content") or "").casefold().split())
             for example in train for m in example.messages or () if m["role"] == "user"}
    copied = [item.question for item in heldout if " ".join(item.question.casefold().split()) in asked]
    if copied:
        message = (f"held-out questions that the training data also asks: {len(copied)} of {len(heldout)} (first: "
                   f"{copied[0][:80]!r}); held-out accuracy on them measures memorisation, not how the model does on "
                   "new questions, so reword them or remove them from the training data")
        say_once(log, logging.WARNING, message)


def without_system_prompt(examples: list[Example]) -> list[Example]:
    """The conversations that get the recipe's system prompt, as they are (asked without it): the contrast
    half of `data.replay.contrast`. Conversations with a system turn of their own, and plain text, are left out."""
    return [e for e in examples if e.messages is not None and e.messages[0]["role"] != "system"]


def train_eval_examples(cfg: DataConfig, seed: int) -> tuple[list[Example], list[Example]]:
    """The recipe's training and eval examples: `data.eval`, or the `eval_fraction` split of `data.train`."""
    examples = load_examples(cfg.train, cfg.format, cfg.columns)
    if cfg.eval:
        train, held_out = examples, load_examples(cfg.eval, cfg.format, cfg.columns, mapped_elsewhere=True)
        if len(held_out) > LARGE_EVAL_SPLIT:  # used whole (data.max_eval_examples limits a split only)
            say_once(log, logging.WARNING, f"data.eval holds {len(held_out)} examples, all evaluated at every "
                     "evaluation, which can take longer than training: keep a sample of about "
                     f"{LARGE_EVAL_SPLIT} in the eval file", key=str(cfg.eval))
    else:
        train, held_out = split_train_eval(examples, cfg.eval_fraction, seed, cfg.max_eval_examples)
    warn_duplicates(examples, train, held_out, split=not cfg.eval)
    if cfg.system_prompt and examples and all(e.messages is None for e in examples):
        say_once(log, logging.WARNING, f"data.system_prompt ({abridged(cfg.system_prompt)}) is not trained: the "
                 "training data is plain text, trained as it is without a chat template, yet `peftkit chat` and the "
                 "exports would start every conversation with this system prompt, which the model never saw; remove "
                 "it, or train on conversations", key=str(cfg.train))
    elif cfg.system_prompt and examples and never_given_system_prompt(examples, cfg.system_prompt):
        say_once(log, logging.WARNING, f"data.system_prompt ({abridged(cfg.system_prompt)}) is not trained: every "
                 "training conversation has a system turn of its own, which wins over it, yet the held-out scoring, "
                 "`peftkit chat` and the exports ask with this one, which the model never saw; remove "
                 "data.system_prompt, or set it to the data's own", key=str(cfg.train))
    return train, held_out


def data_summary_line(stats: dict[str, Any], max_seq_len: int) -> str:
    """One line on what the data became (`DataBundle.stats`): rows, formats, what was cut, trained tokens."""
    cut = [f"{stats['train_truncated']} cut at max_seq_len={max_seq_len}"] if stats["train_truncated"] else []
    lost = stats.get("train_replies_lost")
    cut += [f"{lost} repl{'y' if lost == 1 else 'ies'} past it lost"] if lost else []
    cut += ([f"{stats['train_split']} long text{'s' * (stats['train_split'] != 1)} split into {stats['train_split_rows']} rows"]
            if stats.get("train_split") else [])
    cut += [f"{stats['train_dropped']} dropped (no trained token left)"] if stats["train_dropped"] else []
    formats = sorted(stats.get("train_formats", {}).items(), key=lambda item: -item[1])  # as `format: auto` read them
    read_as = [f"{formats[0][0]} format" if len(formats) == 1 else ", ".join(f"{n} {name}" for name, n in formats)]
    notes = "; ".join(read_as * bool(formats) + ([", ".join(cut)] if cut else []))
    parts = [f"{stats['train_rows'] - stats['replay_examples']} training rows" + (f" ({notes})" if notes else ""),
             f"{stats['train_supervised_tokens']:,} trained tokens an epoch", f"{stats['eval_rows']} eval rows"]
    parts += [f"{stats['replay_examples']} replay rows"] if stats["replay_examples"] else []
    parts += [f"{stats['heldout_questions']} held-out questions"] if stats["heldout_questions"] else []
    return "Data: " + ", ".join(parts)


def never_given_system_prompt(examples: list[Example], system_prompt: str) -> bool:
    """Whether no conversation trains with `system_prompt`: each has its own, non-blank system turn (which
    with_system_prompt keeps), and none of those is this prompt."""
    own = set()
    for example in examples:
        if example.messages is None:
            continue
        first = example.messages[0] if example.messages else {}
        text = str(first.get("content") or "").strip() if first.get("role") == "system" else ""
        if not text:
            return False
        own.add(text)
    return bool(own) and system_prompt.strip() not in own


def _nothing_left(sources: list[str | Path], count: int, name: str, max_seq_len: int) -> DataError:
    return DataError(f"{', '.join(map(str, sources))}: none of the {count} {name} examples has a trained (assistant) "
                     f"token left within data.max_seq_len={max_seq_len} tokens (the prompt fills it); raise "
                     "data.max_seq_len or shorten the conversations and system prompt")


def build_datasets(
    cfg: DataConfig, tokenizer: Any, seed: int = 42, replay_answerer: ReplayAnswerer | None = None
) -> DataBundle:
    """`replay_answerer` rewrites the sampled replay answers (self-distilled replay, see data/replay.py)."""
    train_examples, eval_examples = train_eval_examples(cfg, seed)
    train_rows, train_stats = tokenize_examples(train_examples, tokenizer, cfg.max_seq_len, cfg.system_prompt,
                                                train_on_prompt=cfg.train_on_prompt, what="training example",
                                                refused_when_empty=True)
    if train_examples and not train_rows:  # before replay rows join them: a run of replay alone is no domain run
        raise _nothing_left(data_sources(cfg.train), len(train_examples), "training", cfg.max_seq_len)
    replayed = contrasted = 0
    if cfg.replay is not None:
        # Replay stands for the model's general use, so it keeps its own system prompt (or the chat
        # template's default), not the recipe's domain one.
        pool = load_replay(cfg.replay.path, cfg.replay.answers, known_only=cfg.replay.known_only)
        picked = sample_replay(len(train_examples), pool, cfg.replay.ratio, seed)
        contrast = without_system_prompt(train_examples) if cfg.replay.contrast else []
        if replay_answerer is not None:
            picked = replay_answerer(picked)
            # known_only would drop the contrast rows it exists for: their written answers are the domain's
            contrast = replay_answerer(contrast, check_known=False) if contrast else []
        picked, contrasted = [*picked, *contrast], len(contrast)
        replay_rows, _ = tokenize_examples(picked, tokenizer, cfg.max_seq_len, None, what="replay example",
                                           refused_when_empty=True)
        if picked and not replay_rows:
            raise DataError(f"data.replay: none of the {len(picked)} replay examples has a trained (assistant) token "
                            f"left within data.max_seq_len={cfg.max_seq_len} tokens, so the run would train without "
                            "the replay the recipe asks for; raise data.max_seq_len or use a replay file with shorter "
                            "prompts")
        train_rows, replayed = [*train_rows, *replay_rows], len(replay_rows)
    eval_rows, _ = tokenize_examples(eval_examples, tokenizer, cfg.max_seq_len, cfg.system_prompt, what="eval example",
                                     refused_when_empty=True)
    if eval_examples and not eval_rows:
        raise _nothing_left(data_sources(cfg.eval or cfg.train), len(eval_examples), "eval", cfg.max_seq_len)
    heldout = load_heldout(cfg.heldout, cfg.system_prompt) if cfg.heldout else []
    warn_heldout_in_training(heldout, train_examples)
    stats = {
        **{f"train_{k}": v for k, v in train_stats.items()},
        "train_rows": len(train_rows),
        "eval_examples": len(eval_examples),
        "eval_rows": len(eval_rows),
        "heldout_questions": len(heldout),
        "replay_examples": replayed,
        "replay_contrast_prompts": contrasted,
        "train_tokens": sum(len(r["input_ids"]) for r in train_rows),
        "train_supervised_tokens": sum(trained_count(r["labels"]) for r in train_rows),
        "train_formats": dict(Counter(e.format for e in train_examples if e.format)),  # as auto-detection read them
        "train_with_tools": sum(bool(e.tools) for e in train_examples),
    }
    return DataBundle(train_rows, eval_rows, heldout, stats, split_fingerprint(train_examples, eval_examples))


MISMATCH_ADVICE = ("tokenizer and model do not belong together (tokens added to the tokenizer without "
                   "`model.resize_token_embeddings(len(tokenizer))` before saving, or another model's tokenizer); save the "
                   "model with resized embeddings next to its tokenizer, or use the model's own tokenizer")


def check_token_ids_fit(data: DataBundle, embedding_rows: int, model_name: str, tokenizer: Any = None) -> None:
    """Token ids past the model's embedding table fail deep inside the first forward pass (IndexError); say why.
    Ids the data does not use are a warning: chat and export would meet them later."""
    top = max((max(row["input_ids"]) for row in (*data.train, *data.eval) if row["input_ids"]), default=-1)
    if top >= embedding_rows:
        raise DataError(f"the tokenizer writes token id {top}, but the model {model_name} has only {embedding_rows} "
                        f"input embeddings: {MISMATCH_ADVICE}")
    if tokenizer is not None and len(tokenizer) > embedding_rows:
        beyond = tokenizer.convert_ids_to_tokens(list(range(embedding_rows, min(len(tokenizer), embedding_rows + 3))))
        log.warning("the tokenizer has %d tokens, but the model %s has only %d input embeddings: the data does not "
                    "use the ones beyond (%s%s), but a chat prompt or an export that meets them fails: %s",
                    len(tokenizer), model_name, embedding_rows, ", ".join(map(repr, beyond)),
                    ", ..." if len(tokenizer) > embedding_rows + 3 else "", MISMATCH_ADVICE)


def general_rows(data: DataBundle, cfg: DataConfig, tokenizer: Any) -> list[Row]:
    """Rows that stand for the model's general use: the run's replay rows, or the built-in general set as
    written (calibration for knowledge-preserving inits; only the inputs matter there)."""
    n = data.stats["replay_examples"]
    if n:
        return data.train[-n:]
    return tokenize_examples(load_replay(f"{BUILTIN_PREFIX}general"), tokenizer, cfg.max_seq_len, None)[0]


class PaddingCollator:
    """Right-pads a batch; labels are padded with IGNORE_INDEX by position (never by token id)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for row in rows:
            pad = length - len(row["input_ids"])
            batch["input_ids"].append(row["input_ids"] + [self.pad_token_id] * pad)
            batch["attention_mask"].append([1] * len(row["input_ids"]) + [0] * pad)
            batch["labels"].append(row["labels"] + [IGNORE_INDEX] * pad)
        tensors = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        teacher = next((r for r in rows if "teacher_ids" in r), None)
        if teacher is not None:  # distilled replay (train/distill.py): soft targets for the whole batch
            from peftkit.train.distill import teacher_batch

            tensors.update(teacher_batch(rows, len(teacher["teacher_ids"][0])))
        return tensors


def supervised_segments(row: Row, tokenizer: Any) -> list[tuple[str, bool]]:
    """The row's text in runs of (text, trained?): what `peftkit validate --show-data` prints, so a user can
    see that only the replies (and their end-of-turn) carry loss."""
    segments: list[tuple[str, bool]] = []
    start = 0
    flags = trained_flags(row["labels"])
    for end in range(1, len(flags) + 1):
        if end == len(flags) or flags[end] != flags[start]:
            segments.append((tokenizer.decode(row["input_ids"][start:end]), flags[start]))
            start = end
    return segments
