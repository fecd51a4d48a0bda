"""Chat templating with loss only on assistant tokens.

We render the whole conversation once with the tokenizer's chat template, locate each
assistant reply by rendering the conversation prefixes, and supervise exactly the tokens whose
characters fall inside a reply, including the end-of-turn token that closes it (a reply with axolotl's
`train_detail`: the parts it marks trained, and its end-of-turn; templates that rewrite history, like Qwen3's,
get one row per assistant turn instead). Labels are
assigned by position, never by token id: SmolLM2's pad token *is* its end-of-turn token, and a
collator that masks by id teaches the model never to stop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from peftkit.data.formats import Message
from peftkit.errors import DataError, PeftkitError
from peftkit.utils.once import remembered

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


def trained_flags(labels: Sequence[int]) -> list[bool]:
    """Which positions of a row carry loss. The first never does, whatever its label (`train_on_prompt` labels it):
    the loss predicts each token from those before it."""
    return [i > 0 and label != IGNORE_INDEX for i, label in enumerate(labels)]


def trained_count(labels: Sequence[int]) -> int:
    return sum(trained_flags(labels))


def with_system_prompt(messages: Sequence[Message], system_prompt: str | None) -> list[Message]:
    """`system_prompt` first unless the conversation has its own. A blank system turn (common in ShareGPT exports)
    counts as none: it would be trained with an empty system turn and served with the recipe's or the template's."""
    messages = list(messages)
    if messages and messages[0]["role"] == "system" and not str(messages[0].get("content") or "").strip():
        messages = messages[1:]
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def fold_system_prompt(messages: Sequence[Message]) -> list[Message] | None:
    """The conversation with its system message put at the start of the first user message (None if it has
    no leading system message, or no user message right after it)."""
    if not messages or messages[0]["role"] != "system":
        return None
    system, rest = messages[0]["content"], list(messages[1:])
    if not rest:
        return []
    if rest[0]["role"] != "user":
        return None
    return [{**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]


_warned: set[tuple[str, int]] = remembered(set())  # (topic, template) pairs already warned about


def _warn_once(tokenizer: Any, topic: str, message: str, *args: Any) -> None:
    """Log `message` the first time `topic` comes up for this chat template (not once per conversation)."""
    key = (topic, hash(str(tokenizer.chat_template)))
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


Tools = Sequence[dict[str, Any]] | None
"""Function schemas a conversation may call, passed to the chat template as `tools`."""


def _render(
    tokenizer: Any, messages: Sequence[Message], generation_prompt: bool = False, where: str = "", tools: Tools = None
) -> str:
    """The chat template's text for `messages`. Templates that refuse a system message (Mistral 7B v0.1/v0.2,
    Gemma 1, Llama-2-era Mistral fine-tunes) get it folded into the first user message instead, as
    LLaMA-Factory does and as Gemma's later templates do themselves."""
    from jinja2.exceptions import TemplateError, TemplateSyntaxError

    if not getattr(tokenizer, "chat_template", None) and getattr(tokenizer, "no_template_reason", None):
        raise PeftkitError(f"{where}: {tokenizer.no_template_reason}" if where else tokenizer.no_template_reason)

    def render(conversation: Sequence[Message]) -> str:
        extra = {"tools": list(tools)} if tools else {}
        return tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=generation_prompt,
                                             **extra)

    try:
        text = render(messages)
    except TemplateSyntaxError as exc:  # the template's own fault, whatever the conversation
        raise PeftkitError(f"the chat template is not valid Jinja (line {exc.lineno}: {exc.message}): fix the template "
                           "file model.chat_template names, or set `model.chat_template` to `chatml` or a template "
                           "file that fits this model") from None
    except TemplateError as exc:
        refusal: Exception | str = exc
    else:
        if not _drops_system_message(messages, text, render):
            return text
        refusal = "it leaves them out"
    folded = fold_system_prompt(messages)
    if folded is not None:
        try:
            text = render(folded)
        except TemplateError:
            pass
        else:
            _warn_once(tokenizer, "system", "The chat template refuses system messages (%s); the system prompt goes "
                       "at the start of the first user message instead", refusal)
            return text
    at = f"{where}: " if where else ""
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        raise DataError(
            f"{at}the chat template refused this tool-use conversation: {refusal}. Where that is what the template "
            "asks of tool use (call ids, one call at a time), fix the data; where it has no tool support at all (no "
            "`tool` role, no `tool_calls`), set `model.chat_template: chatml` where the vocabulary has ChatML's "
            "tokens, or point it at a template file that renders `tools`, `tool_calls` and `tool` messages"
        ) from None
    raise DataError(
        f"{at}the chat template refused this conversation: {refusal}. Fix the conversation (roles in the order the "
        "template wants), or set `model.chat_template` to a template that accepts it (e.g. `chatml`)"
    ) from None


def _drops_system_message(messages: Sequence[Message], text: str, render: Callable[[Sequence[Message]], str]) -> bool:
    """Whether the template left the leading system message out (some render user and assistant turns only): the
    system prompt would be trained and served as absent, without a word. Its text shown nowhere says so (as written,
    or JSON-escaped by `| tojson`); where a later message quotes it, only the same text without it does."""
    from jinja2.exceptions import TemplateError

    system = str(messages[0].get("content") or "").strip() if messages and messages[0]["role"] == "system" else ""
    if not system:
        return False
    if not _shown(system, text):
        return True
    if not any(_shown(system, str(m.get("content") or "")) for m in messages[1:]):
        return False
    try:
        return render(messages[1:]) == text
    except TemplateError:
        return False


class HistoryRenderedDifferently(DataError):
    """The template renders an earlier assistant turn differently once later turns follow it (Qwen3, QwQ and
    DeepSeek-R1 drop `<think>` blocks from history), so one rendering cannot hold every turn as it is generated."""

    def __init__(self, where: str, turn: int, *, system_moves: bool = False) -> None:
        self.finding = (f"the chat template shows the system prompt in the conversation's last user message only (as "
                        f"Mistral v0.3's does), so turn {turn} is served after another prompt than the whole "
                        "conversation shows" if system_moves else
                        f"the chat template renders turn {turn} differently once later turns follow it (e.g. dropping "
                        "<think> blocks from earlier replies)")
        super().__init__(f"{where}: {self.finding}")


def _reply_span(
    tokenizer: Any, messages: Sequence[Message], i: int, where: str, tools: Tools = None
) -> tuple[str, tuple[int, int]]:
    """`messages[: i + 1]` rendered, and the character span of its last (assistant) reply with its end-of-turn."""
    prefix = _render(tokenizer, messages[:i], generation_prompt=True, where=where, tools=tools)
    through = _render(tokenizer, messages[: i + 1], where=where, tools=tools)
    placed = None if through.startswith(prefix) else _system_placed_by_position(tokenizer, messages, i, through, tools)
    if not through.startswith(prefix) and placed is None:
        raise DataError(
            f"{where}: the chat template's generation prompt is not how it starts an assistant turn, so replies "
            "cannot be located; set `model.chat_template: chatml` or provide a simpler template"
        )
    through = through[: _conversation_end(tokenizer, messages, i, through, tools)]
    if placed is not None:  # the reply as rendered, after the prompt as served (a row of its own: rewritten history)
        through = prefix + through[len(placed):]
    span = (len(prefix), len(through.rstrip()))  # the newline after the end-of-turn is not the reply's
    if messages[i].get("tool_calls"):  # the tools' names may show elsewhere (schemas): the call must be in the reply
        _check_tool_use_rendered(through[span[0] : span[1]], messages[i : i + 1], None, where)
    _check_reply_rendered(messages[i], through[span[0] : span[1]], i, where)
    return through, span


def _system_placed_by_position(
    tokenizer: Any, messages: Sequence[Message], i: int, through: str, tools: Tools
) -> str | None:
    """The generation prompt of `messages[:i]` as `through` renders it, where the template shows the system prompt
    only in the conversation's last user message (Mistral v0.3: the served prompt has it there, while a conversation
    ending in a reply leaves it out and gets it folded into the first user message): None for other templates."""
    folded = fold_system_prompt(messages[:i])
    if not folded:
        return None
    try:
        served_folded = _render(tokenizer, folded, generation_prompt=True, tools=tools)
    except DataError:
        return None
    return served_folded if through.startswith(served_folded) else None


def _only_system_moves(tokenizer: Any, messages: Sequence[Message], i: int, tools: Tools) -> bool:
    """Whether reply `i` keeps its place in the whole conversation once the system message is left out: then what
    differs is only where the template shows the system prompt, not how it renders history."""
    if not messages or messages[0]["role"] != "system":
        return False
    rest = messages[1:]
    try:
        return _render(tokenizer, rest, tools=tools).startswith(_reply_span(tokenizer, rest, i - 1, "", tools)[0])
    except DataError:
        return False


def _check_reply_rendered(message: Message, reply: str, i: int, where: str) -> None:
    """A template that leaves part of a reply's text out (DeepSeek-R1 distills' `content.split('</think>')[-1]`
    drops the reasoning, Llama 3.1 the text beside a tool call) would train the reply without it, without a word.
    Compared without whitespace: templates trim, and Qwen3's re-wraps a <think> block in its own newlines."""
    content = message.get("content")
    if not isinstance(content, str) or not content.strip():
        return
    written, rendered = "".join(content.split()), "".join(reply.split())
    if written in rendered or "".join(json.dumps(content)[1:-1].split()) in rendered:
        return
    raise DataError(
        f"{where}: the chat template leaves part of reply {i + 1}'s text out ({abridged(content)!r} is rendered as "
        f"{abridged(reply)!r}), so it would be trained without it. Point `model.chat_template` at a template that "
        "renders assistant replies as written (e.g. one that keeps <think> blocks), or remove that text from the data"
    )


def abridged(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _conversation_end(tokenizer: Any, messages: Sequence[Message], i: int, through: str, tools: Tools) -> int:
    """Where `through` (the conversation rendered up to reply `i`) stops being that reply: Phi-3's template closes
    a whole conversation with EOS after the last `<|end|>`, which is not the reply's, and which a later turn does not
    follow. The end is where a continued conversation departs from `through`, when all it leaves out is special
    tokens (a template that rewrites the reply itself, such as Qwen3's, is handled as rewritten history)."""
    try:
        longer = _render(tokenizer, [*messages[: i + 1], {"role": "user", "content": "…"}], tools=tools)
    except DataError:  # a template that wants something else after this reply (a tool's result)
        return len(through)
    same = len(os.path.commonprefix([through, longer]))
    if same == len(through):
        return same
    specials = special_tokens_pattern(tokenizer)
    if specials is None:
        return len(through)
    # "<|endoftext|>" and "<|user|>" share "<|": the departure is at the start of the token it falls in
    same = next((m.start() for m in specials.finditer(through) if m.start() < same < m.end()), same)
    if specials.sub("", through[same:]).strip():
        return len(through)
    # Only a suffix after the reply's own end token is the conversation's: gpt-oss ends its last reply with
    # <|return|> and earlier ones with <|end|>, an Alpaca-style template ends replies with the closing EOS alone.
    kept = through[:same].rstrip()
    return same if any(m.end() == len(kept) for m in specials.finditer(kept)) else len(through)


def _trained_turns(messages: Sequence[Message]) -> list[int]:
    # weight 0: context, not trained on
    return [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) != 0]


def _trained_parts(tokenizer: Any, message: Message, text: str, span: tuple[int, int], i: int, where: str
                   ) -> list[tuple[int, int]]:
    """The character ranges of reply `i`'s `span` in `text` that are trained: the whole span, or with `train_detail`
    the ranges of the content it marks trained plus the template's own text in the span, the end-of-turn included
    (as axolotl trains a turn's end-of-turn whatever its `train_detail` masks)."""
    detail = message.get("train_detail")
    if not detail:
        return [span]
    content, lo, hi = message["content"], *span
    at, lead = _content_at(tokenizer, content, text, lo, hi), 0
    if at < 0 and content.strip():  # templates that trim replies (Llama 3, Gemma): offsets past the cut whitespace
        lead = len(content) - len(content.lstrip())
        content = content.strip()
        at = _content_at(tokenizer, content, text, lo, hi)
    if at < 0:
        raise DataError(
            f"{where}: reply {i + 1} has a `train_detail`, but the chat template changes the reply's text "
            f"({abridged(message['content'])!r} is rendered as {abridged(text[lo:hi])!r}), so its character offsets "
            "cannot be applied. Point `model.chat_template` at a template that renders replies as written, or drop "
            "`train_detail` from the message"
        )
    kept = [(at + max(begin - lead, 0), at + min(end - lead, len(content))) for begin, end, train in detail if train]
    parts = [(lo, at), *kept, (at + len(content), hi)]
    return [(begin, end) for begin, end in parts if begin < end]


def _content_at(tokenizer: Any, content: str, text: str, lo: int, hi: int) -> int:
    """Where a reply's content starts in its rendered span `text[lo:hi]`, -1 when it is not there verbatim: just
    before the template's end-of-turn text where it is there (a short reply may also occur inside the template's own
    text, `<think>` holding "in"), else its last occurrence."""
    marker = _reply_end_marker(tokenizer)
    end = hi - len(marker) if marker and text.endswith(marker, lo, hi) else hi
    if text.startswith(content, end - len(content), end) and end - len(content) >= lo:
        return end - len(content)
    return text.rfind(content, lo, hi)


def _check_tool_use_rendered(text: str, messages: Sequence[Message], tools: Tools, where: str) -> None:
    """Templates without tool support render tool calls as empty replies and drop `tools`: training on that
    teaches the model to answer with nothing, so refuse before any weights load."""
    lost = [f"the tool schema {_tool_name(t)!r}" for t in tools or () if _tool_name(t) not in text]
    lost += [f"the tool call {c['function']['name']!r}" for m in messages for c in m.get("tool_calls", ())
             if c["function"]["name"] not in text]
    lost += [f"a {m['role']!r} message" for m in messages if m["role"] == "tool" and not _shown(m["content"], text)]
    if lost:
        raise DataError(
            f"{where}: the chat template leaves out {lost[0]}: it does not render tool use. Set "
            "`model.chat_template: chatml` (tools in the system turn, calls as <tool_call> JSON, results as `tool` "
            "turns) or point it at a template file that renders `tools`, `tool_calls` and `tool` messages"
        )


def tool_left_out(tokenizer: Any, tools: Tools, system_prompt: str | None) -> str | None:
    """The name of a tool whose schema the chat template leaves out of a prompt (a template without tool support
    drops `tools`), or None when each one is shown."""
    text = generation_prompt(tokenizer, with_system_prompt([{"role": "user", "content": "?"}], system_prompt), tools)
    return next((name for name in map(_tool_name, tools or ()) if name not in text), None)


def check_tools_shown(tokenizer: Any, tools: Tools, system_prompt: str | None) -> None:
    """Chat's side of _check_tool_use_rendered: the model would be asked without the tools, and it never learnt a
    way to call them."""
    missing = tool_left_out(tokenizer, tools, system_prompt)
    if missing:
        raise DataError(f"--tools: the run's chat template leaves the tool schemas out of the prompt ({missing!r} "
                        "is not in it), so the model would never see them and was not trained to call them. Train "
                        "with `model.chat_template: chatml` (or a template file that renders `tools`) to chat with tools")


def heldout_tools_problem(tokenizer: Any, items: Sequence[Any], system_prompt: str | None) -> str | None:
    """What is wrong when held-out questions asked with tools reach the model without their schemas: each would be
    scored on calling a tool the prompt never names."""
    asked = next((item for item in items if item.tools), None)
    missing = tool_left_out(tokenizer, asked.tools, system_prompt) if asked is not None else None
    if missing is None:
        return None
    return (f"held-out questions come with `tools`, but the chat template leaves the tool schemas out of the prompt "
            f"({missing!r} is not in it), so the model would be scored on calling tools it is never shown: use "
            "`model.chat_template: chatml` (or a template file that renders `tools`), or ask those questions without "
            "tools")


def _shown(content: str, text: str) -> bool:
    """Whether `content` is in `text` as it is or JSON-escaped (templates that wrap tool results in JSON)."""
    content = content.strip()
    return content in text or json.dumps(content)[1:-1] in text or json.dumps(content, ensure_ascii=False)[1:-1] in text


def _tool_name(tool: dict[str, Any]) -> str:
    return str(tool.get("function", tool)["name"])


def render_with_reply_spans(
    tokenizer: Any, messages: Sequence[Message], where: str = "", tools: Tools = None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every trained assistant reply (with its end-of-turn)."""
    text = _render(tokenizer, messages, where=where, tools=tools)
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        _check_tool_use_rendered(text, messages, tools, where)
    spans = []
    for i in _trained_turns(messages):
        through, span = _reply_span(tokenizer, messages, i, where, tools)
        if not text.startswith(through):
            raise HistoryRenderedDifferently(where, i + 1, system_moves=_only_system_moves(tokenizer, messages, i, tools))
        spans.append(span)
    return text, spans


PREFIX_CHARS_PER_TOKEN = 16
PREFIX_MARGIN_TOKENS = 128


def _encode_prefix(tokenizer: Any, text: str, max_seq_len: int, **kwargs: Any) -> Any:
    """Tokenize enough of `text` to give its first `max_seq_len` tokens (all that training keeps): a 50 MB record
    tokenized whole took minutes and gigabytes. The text is cut at growing lengths until the encoding runs well
    past `max_seq_len` tokens, so the cut (which can change the last tokens before it) never reaches the kept ones.
    (One exception: a Unigram tokenizer given a word longer than the cut window may split its start differently.)"""
    limit = (max_seq_len + PREFIX_MARGIN_TOKENS) * PREFIX_CHARS_PER_TOKEN
    while limit < len(text):
        # At a space where there is one: a Unigram tokenizer segments each word as a whole, so a word cut in two
        # could be split differently from its start.
        space = max(text.rfind(" ", limit // 2, limit), text.rfind("\n", limit // 2, limit))
        encoded = tokenizer(text[:space if space > 0 else limit], **kwargs)
        if len(encoded["input_ids"]) > max_seq_len + PREFIX_MARGIN_TOKENS:
            return encoded
        limit *= 4
    return tokenizer(text, **kwargs)


def _encode_split_at(tokenizer: Any, text: str, cuts: list[int], max_seq_len: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and offsets of `text` encoded piece by piece, the pieces cut at `cuts`, until past `max_seq_len`."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for lo, hi in zip([0, *cuts], [*cuts, len(text)]):
        piece = _encode_prefix(tokenizer, text[lo:hi], max_seq_len, add_special_tokens=False, return_offsets_mapping=True)
        ids += piece["input_ids"]
        offsets += [(start + lo, end + lo) for start, end in piece["offset_mapping"]]
        if len(ids) > max_seq_len + PREFIX_MARGIN_TOKENS:
            break
    return ids, offsets


def _labelled(
    tokenizer: Any, text: str, spans: list[tuple[int, int]], max_seq_len: int, trained: list[tuple[int, int]] | None = None
) -> tuple[dict[str, list[int]], bool]:
    """Token ids and labels of `text`: a token is trained when its first character lies in one of the reply `spans`
    (or, given `trained`, in one of those ranges: the parts of the replies that `train_detail` trains)."""
    encoded = _encode_prefix(tokenizer, text, max_seq_len, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = encoded["input_ids"]
    offsets: list[tuple[int, int]] = encoded["offset_mapping"]
    # A generation prompt that ends in a space ("ASSISTANT: "): the reply's first token (" Martha") starts in the
    # prompt, so it would go untrained, and served models see the prompt tokenized on its own, ending in a space
    # token, which training never showed. Encoded in pieces cut at each reply's start, training sees what serving does.
    straddled = [lo for lo, _ in spans if any(start < lo < end for start, end in offsets)]
    # A prompt whose last tokens change once the reply follows ("\n\n" is one token at the end of a text and two
    # before a word under GPT-2's pre-tokenizer): served, the prompt ends in tokens training never showed.
    served_apart = [lo for lo, _ in spans if lo not in straddled and _tokenized_apart(tokenizer, text, lo, input_ids, offsets)]
    if straddled or served_apart:
        split_ids, split_offsets = _encode_split_at(tokenizer, text, sorted(straddled + served_apart), max_seq_len)
        split_text, whole_text = tokenizer.decode(split_ids), tokenizer.decode(input_ids)
        same = min(len(split_text), len(whole_text))
        if split_text[:same] == whole_text[:same]:
            input_ids, offsets = split_ids, split_offsets
        elif straddled:  # e.g. a sentencepiece tokenizer that puts a space before each piece it encodes
            _warn_once(tokenizer, "straddle", "the chat template's generation prompt ends in whitespace that this "
                       "tokenizer joins to the reply's first token, which is not trained: remove the whitespace at "
                       "the end of the template's assistant header (model.chat_template)")
        else:
            _warn_once(tokenizer, "served-apart", "the chat template's generation prompt ends in text this tokenizer "
                       "encodes differently on its own (as chat and eval send it) than followed by a reply (as "
                       "training sees it), so a tuned model is served a prompt ending it never learnt from: remove "
                       "the whitespace at the end of the template's assistant header (model.chat_template)")
    labels = [IGNORE_INDEX] * len(input_ids)
    for index, (start, _end) in enumerate(offsets):
        if any(lo <= start < hi for lo, hi in (spans if trained is None else trained)):
            labels[index] = input_ids[index]
    truncated = len(input_ids) > max_seq_len
    return {"input_ids": input_ids[:max_seq_len], "labels": labels[:max_seq_len]}, truncated


def _tokenized_apart(tokenizer: Any, text: str, cut: int, ids: list[int], offsets: list[tuple[int, int]]) -> bool:
    """Whether `text[:cut]` encoded on its own gives other tokens than it has within the whole text's `ids` (checked
    while those lie within the encoded window: a reply past it is truncated away)."""
    before = sum(1 for _start, end in offsets if end <= cut)
    if before == len(ids):
        return False
    return tokenizer(text[:cut], add_special_tokens=False)["input_ids"] != ids[:before]


def tokenize_conversation(
    tokenizer: Any, messages: Sequence[Message], max_seq_len: int, where: str = "", tools: Tools = None
) -> tuple[dict[str, list[int]], bool]:
    """Token ids and labels (IGNORE_INDEX outside assistant replies); also whether it was truncated."""
    text, spans = render_with_reply_spans(tokenizer, messages, where, tools)
    trained = [part for i, span in zip(_trained_turns(messages), spans, strict=True)
               for part in _trained_parts(tokenizer, messages[i], text, span, i, where)]
    return _labelled(tokenizer, text, spans, max_seq_len, trained)


def replies_cut_off(tokenizer: Any, messages: Sequence[Message], max_seq_len: int, where: str = "",
                    tools: Tools = None) -> int:
    """How many trained replies of a conversation start past its first `max_seq_len` tokens, found by position
    (a reply that `train_detail` masks in the middle is several runs of trained tokens, so runs cannot count them).
    0 for a template that rewrites history: its rows that lost their reply are dropped, and counted there."""
    try:
        text, spans = render_with_reply_spans(tokenizer, messages, where, tools)
    except HistoryRenderedDifferently:
        return 0
    offsets = _encode_prefix(tokenizer, text, max_seq_len, add_special_tokens=False,
                             return_offsets_mapping=True)["offset_mapping"]
    kept_end = offsets[max_seq_len - 1][1] if len(offsets) > max_seq_len else len(text)
    return sum(start >= kept_end for start, _end in spans)


def tokenize_conversation_rows(
    tokenizer: Any, messages: Sequence[Message], max_seq_len: int, where: str = "", tools: Tools = None, *,
    train_on_prompt: bool = False,
) -> tuple[list[dict[str, list[int]]], int]:
    """Training rows of one conversation (one row; one per trained turn where the template rewrites history),
    and how many of them were truncated. `train_on_prompt`: every token is trained, not only the replies.

    With a template that renders history differently, each assistant turn is trained as the last turn of
    its own row, in the context the model sees when it generates that turn (earlier turns as history). With
    `train_on_prompt`, a row trains what comes after the previous row's reply, so no turn is trained twice.
    """
    try:
        row, truncated = tokenize_conversation(tokenizer, messages, max_seq_len, where, tools)
        if train_on_prompt:
            row = {"input_ids": row["input_ids"], "labels": list(row["input_ids"])}
        return [row], int(truncated)
    except HistoryRenderedDifferently as exc:
        _warn_once(tokenizer, "history", "%s: each assistant turn of a multi-turn conversation is trained as the last "
                   "turn of its own row", exc.finding)
    rows, truncated, previous = [], 0, None
    marker = _reply_end_marker(tokenizer) if train_on_prompt else ""
    for i in _trained_turns(messages):
        text, span = _reply_span(tokenizer, messages, i, where, tools)
        reply_start, trained = span[0], _trained_parts(tokenizer, messages[i], text, span, i, where)
        if train_on_prompt:  # every token is trained, the parts train_detail leaves out too (as `weight: 0` turns)
            span = (0 if previous is None else _after_history(tokenizer, messages, previous, text, tools, marker),
                    span[1])
            trained = [span]
        row, cut = _labelled(tokenizer, text, [span], max_seq_len, trained)
        rows.append(row)
        truncated += cut
        previous = (i, text, reply_start)
    if train_on_prompt and messages and messages[-1]["role"] != "assistant":
        _warn_once(tokenizer, "trailing-rows", "conversations that end with a user or tool turn after the last "
                   "assistant reply: with this template each reply is its own row, ending at the reply, so that "
                   "trailing turn is in no row and not trained, data.train_on_prompt notwithstanding; end each "
                   "conversation with the assistant's reply, or drop the trailing turn")
    return rows, truncated


HISTORY_PROBE = "\u2063peftkit history probe"


def _after_history(
    tokenizer: Any, messages: Sequence[Message], previous: tuple[int, str, int], text: str, tools: Tools, marker: str
) -> int:
    """Where `text` (the row of a later reply) goes on past the previous row's reply as it shows there: past that
    reply's end `marker` (`<|im_end|>`), so the next turn's header is trained as in a one-row conversation. The
    reply is found in the conversation up to it followed by a probe of the next turn (the same role, other content);
    where the marker is not found after the reply's start, where `text` departs from that probe (the header then goes
    untrained); where the template cannot render the probe, where `text` departs from the previous row itself."""
    i, previous_text, reply_start = previous
    probe_turn = {key: value for key, value in messages[i + 1].items() if key != "tool_calls"}
    try:
        probe = _render(tokenizer, [*messages[: i + 1], {**probe_turn, "content": HISTORY_PROBE}], tools=tools)
    except DataError:
        probe = previous_text
    departs = len(os.path.commonprefix([probe, text]))
    if marker and HISTORY_PROBE in probe:
        at = probe.rfind(marker, 0, min(departs, probe.index(HISTORY_PROBE)))
        if at >= min(reply_start, len(os.path.commonprefix([probe, previous_text]))):
            return at + len(marker)
    return departs


def special_tokens_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """Matches the text of the tokenizer's special tokens (HTML's `<s>` under a Llama tokenizer, a written
    `<|im_end|>`): in data the tokenizer reads them as the tokens themselves, so a reply could teach an end of
    turn halfway through."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    specials = {*tokenizer.all_special_tokens, *(t.content for t in decoder.values() if getattr(t, "special", False))}
    specials.discard("")
    return re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) if specials else None


PROBE_REPLY = "Hi there"


Probe = tuple[str, int | None]
_PROBED: weakref.WeakKeyDictionary[Any, tuple[tuple[str, int], Probe | None]] = weakref.WeakKeyDictionary()
"""Each tokenizer's probe, with the chat template and vocabulary size it was made with: tokenizing asks for it once
per conversation (or per reply, with `train_detail`), and it costs two renderings and a tokenization."""


def _probe_reply(tokenizer: Any) -> tuple[str, int | None] | None:
    """A one-turn probe as training sees it: the reply as rendered (text, end marker included) and its last trained
    token when that is a special token. None when the template cannot render the probe."""
    template = (str(tokenizer.chat_template), len(tokenizer))
    try:
        made_with, probe = _PROBED[tokenizer]
        if made_with == template:
            return probe
    except (KeyError, TypeError):  # TypeError: an object that takes no weak reference
        pass
    probe = _probe_reply_uncached(tokenizer)
    with contextlib.suppress(TypeError):
        _PROBED[tokenizer] = (template, probe)
    return probe


def _probe_reply_uncached(tokenizer: Any) -> tuple[str, int | None] | None:
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": PROBE_REPLY}]
    try:
        text, span = _reply_span(tokenizer, messages, 1, "end-of-turn probe")
    except Exception:  # noqa: BLE001 - a template that cannot render this probe is reported where it is used
        return None
    row, _ = _labelled(tokenizer, text, [span], len(text) + 1)
    trained = [token for token, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return text[span[0]:span[1]], trained[-1] if trained and trained[-1] in special else None


def _marker_of(reply: str) -> str:
    """What the template writes after a reply's text (`<|im_end|>`), from the probe reply as rendered."""
    return reply.split(PROBE_REPLY, 1)[-1]


def _reply_end_marker(tokenizer: Any) -> str:
    """The text that closes an assistant reply (empty where the template cannot render the probe)."""
    probe = _probe_reply(tokenizer)
    return _marker_of(probe[0]) if probe else ""


def end_of_turn_token_id(tokenizer: Any) -> int | None:
    """The special token the chat template closes an assistant reply with (`<|im_end|>`, `<|eot_id|>`,
    `<end_of_turn>`, EOS): training teaches it as the reply's last token, so generation must stop on it, also
    where it is not the tokenizer's EOS (Qwen2.5 base models: ChatML turns, EOS `<|endoftext|>`). None for a
    template that cannot render the probe: generation falls back to EOS alone."""
    probe = _probe_reply(tokenizer)
    return probe[1] if probe else None


def reply_end_problem(tokenizer: Any) -> str | None:
    """What is wrong when the chat template ends an assistant reply with no special token (a ChatML template over a
    vocabulary without `<|im_end|>`): the model would learn to spell the marker out, and generation, which stops on
    tokens, would never stop. None when the reply ends with one, or the template cannot render the probe."""
    probe = _probe_reply(tokenizer)
    if probe is None or probe[1] is not None:
        return None
    marker = _marker_of(probe[0])
    what = f"with {marker!r}, which is not a special token of this tokenizer" if marker else "with no end token at all"
    fix = (f"End replies with a token of this vocabulary, e.g. its end token {tokenizer.eos_token!r} (`{{{{ eos_token }}}}`), "
           "or use `model.chat_template: plain`" if tokenizer.eos_token else
           "This tokenizer has no end-of-sequence token: end replies with another special token of its vocabulary")
    return (f"the chat template ends an assistant reply {what}: the model would learn to spell it out and generation "
            f"would never stop. {fix}")


def tokenize_text_rows(tokenizer: Any, text: str, max_seq_len: int) -> list[dict[str, list[int]]]:
    """Plain text in consecutive blocks of `max_seq_len` tokens, each its own row with every token supervised
    (pretraining style, as TRL's and axolotl's completion training): a long document is trained whole, not cut at
    `max_seq_len`. EOS closes the document; a last block of a single token is left out (a row predicts nothing
    from one token). A tokenizer that ends every text with EOS itself (`add_eos_token`) gets no second one."""
    ids = list(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):  # some add it themselves
        ids.append(tokenizer.eos_token_id)
    blocks = [ids[start : start + max_seq_len] for start in range(0, len(ids), max_seq_len)]
    if len(blocks) > 1 and len(blocks[-1]) < 2:
        blocks.pop()
    return [{"input_ids": block, "labels": list(block)} for block in blocks]


def generation_prompt(tokenizer: Any, messages: Sequence[Message], tools: Tools = None) -> str:
    return _render(tokenizer, messages, generation_prompt=True, tools=tools)


def chat_prompt_has_bos(tokenizer: Any) -> bool | None:
    """Whether a chat prompt as training and chat tokenize it starts with BOS: chat rows are tokenized without the
    tokenizer's own special tokens, so only a template that writes `{{ bos_token }}` gives one. None without a BOS
    token, or where the template cannot render a one-question probe."""
    if not tokenizer.bos_token or not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = render_chat(tokenizer, [{"role": "user", "content": "Hello"}], generation=True)
    except Exception:  # noqa: BLE001 - a template that cannot render the probe is reported where it is used
        return None
    return text.startswith(tokenizer.bos_token)


def render_chat(tokenizer: Any, messages: Sequence[Message], generation: bool) -> str:
    """The text training and chat give the template for `messages` (a refused system message folded)."""
    return _render(tokenizer, messages, generation_prompt=generation)
