"""Records whose fields carry other names: the common one-turn field pairs that auto-detection reads
(Dolly's `instruction`/`context`/`response`, GSM8K's `question`/`answer`, ...), and the recipe's
`data.columns` map for everything else (LLaMA-Factory's `columns` and `tags` in a recipe)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from peftkit.errors import DataError

if TYPE_CHECKING:
    from peftkit.config.schema import ColumnsConfig

Message = dict[str, Any]

PAIR_FIELDS = (("instruction", "response"), ("question", "answer"), ("question", "response"),
               ("query", "response"), ("prompt", "response"), ("input", "output"))
"""(prompt, response) field names of one-turn records read without a map, first match wins: Dolly,
GSM8K, OpenOrca, MetaMathQA and many exports (alpaca's `instruction` + `output` and TRL's `prompt` +
`completion` are matched before these)."""
CONTEXT_FIELDS = ("context", "input")
"""Extra text appended to the prompt after a blank line when the record has it (Dolly's `context`)."""
SYSTEM_FIELDS = ("system", "system_prompt")
"""A per-record system prompt (OpenOrca's `system_prompt`)."""
ROLE_ALIASES = {"system": "system", "developer": "system", "human": "user", "user": "user", "gpt": "assistant",
                "assistant": "assistant", "model": "assistant", "chatgpt": "assistant", "bot": "assistant", "function_call": "assistant",
                "observation": "tool", "tool": "tool", "function": "tool"}
"""Speaker names -> chat roles, case-insensitive (ShareGPT, LLaMA-Factory, axolotl, FastChat, Gemma spellings).
LLaMA-Factory's `function_call` turn is an assistant tool call whose value is the call's JSON; `observation`
is the tool's answer, as is OpenAI's legacy `function` message; OpenAI's `developer` message is its system one."""


def detected_pair(record: Mapping[str, Any]) -> tuple[str, str] | None:
    """The (prompt, response) fields of a one-turn record with well-known field names, or None."""
    return next(((p, r) for p, r in PAIR_FIELDS if p in record and r in record), None)


class WrittenFloat(float):
    """A JSON number read as a float that keeps the text it was written as (`3.10`, `12.50`): trained as written, not
    as Python prints the float (`3.1`, `12.5`). A float everywhere else (weights, scores)."""

    written: str

    def __new__(cls, text: str | float) -> "WrittenFloat":
        number = super().__new__(cls, text)
        number.written = text if isinstance(text, str) else repr(float(text))  # a copy or unpickling passes the float
        return number


def number_as_text(value: Any) -> Any:
    """A numeric answer or input (`4`, `3.5`, as JSON and CSV-derived Parquet hold them) as the text it spells;
    anything else unchanged (booleans stay booleans: `true` is no answer). A whole float is its integer (`4.0`
    -> `4`: pandas stores an integer column with one missing cell as floats, and that cell as NaN, which is a
    missing value, None, not the text "nan"); another JSON number is its text as written (`3.10`, WrittenFloat)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, WrittenFloat):
        return value.written
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def type_name(value: Any) -> str:
    """A JSON value's type in words, for messages that refuse it (`got an object`)."""
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):  # a JSON number (WrittenFloat too)
        return "a number"
    names = {dict: "an object", str: "a string"}
    return names.get(type(value), f"a {type(value).__name__}")


def pair_messages(record: Mapping[str, Any], where: str, prompt: str, response: str,
                  context: str | None = None, system: str | None = None) -> list[Message]:
    """One user turn and one reply from the named fields; `context` (appended to the prompt) and
    `system` may be absent or empty in a record."""
    texts = {}
    for key, field in (("prompt", prompt), ("response", response)):
        value = number_as_text(record.get(field))
        if not isinstance(value, str) or not value.strip():
            found = "is missing" if field not in record else ("is empty" if isinstance(value, str) else
                                                              f"is {type_name(value)}, not text")
            raise DataError(f"{where}: the {key} field {field!r} {found}" + (
                "; training on an empty reply teaches the model to answer with nothing: fill it in or drop the record"
                if key == "response" and isinstance(value, str) else f" (record fields: {record_keys(record, field)})"))
        texts[key] = value
    user = texts["prompt"]
    extra = number_as_text(record.get(context)) if context else None
    if isinstance(extra, str) and extra.strip():
        user = f"{user}\n\n{extra}"
    messages: list[Message] = [{"role": "user", "content": user}, {"role": "assistant", "content": texts["response"]}]
    if system and isinstance(record.get(system), str) and record[system].strip():
        messages.insert(0, {"role": "system", "content": record[system]})
    return messages


def detected_pair_messages(record: Mapping[str, Any], where: str) -> list[Message]:
    pair = detected_pair(record)
    assert pair is not None, "detect_format matched a field pair"
    prompt, response = pair
    context = next((f for f in CONTEXT_FIELDS if f in record and f not in pair), None)
    system = next((f for f in SYSTEM_FIELDS if f in record), None)
    return pair_messages(record, where, prompt, response, context, system)


def speaker_role(speaker: Any, roles: Mapping[str, str], where: str, hint: str) -> str:
    """The chat role of a turn's speaker: the recipe's map first (exact, then ignoring case, as the usual
    spellings are), then the usual spellings."""
    if isinstance(speaker, str) and speaker in roles:
        return roles[speaker]
    folded = {name.casefold(): role for name, role in roles.items()}
    if isinstance(speaker, str) and speaker.casefold() in folded:
        return folded[speaker.casefold()]
    role = ROLE_ALIASES.get(str(speaker).lower())
    if role is None:
        raise DataError(f"{where}: speaker {speaker!r} is not a role peftkit knows ({', '.join(sorted(ROLE_ALIASES))}); "
                        f"{hint}")
    return role


def mapped_text(record: Any, columns: ColumnsConfig, where: str) -> Any:
    """The value of the recipe's `data.columns.text` field (checked as a text by the caller)."""
    if not isinstance(record, Mapping) or columns.text not in record:
        raise DataError(f"{where}: the text field {columns.text!r} (data.columns.text) is missing (record fields: "
                        f"{record_keys(record, columns.text)})")
    return record[columns.text]


def mapped_messages(record: Any, columns: ColumnsConfig, where: str) -> list[Message]:
    """A record read through `data.columns`: a conversation field or a prompt/response pair."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type_name(record)}")
    if columns.messages is None:
        assert columns.prompt and columns.response, "ColumnsConfig validation requires prompt + response"
        return pair_messages(record, where, columns.prompt, columns.response, columns.input, columns.system)
    turns = record.get(columns.messages)
    if not isinstance(turns, list) or not turns:
        found = "is missing" if columns.messages not in record else f"is {type_name(turns)}, not a list of turns"
        raise DataError(f"{where}: the conversation field {columns.messages!r} (data.columns.messages) {found} "
                        f"(record fields: {record_keys(record, columns.messages)})")
    messages: list[Message] = []
    if columns.system and isinstance(record.get(columns.system), str) and record[columns.system].strip():
        messages.append({"role": "system", "content": record[columns.system]})
    hint = "map it in data.columns.roles, e.g. `roles: {customer: user, agent: assistant}`"
    for n, turn in enumerate(turns, start=1):
        at = f"{where}: turn {n}"
        if not isinstance(turn, Mapping) or columns.role not in turn:
            raise DataError(f"{at} has no speaker field {columns.role!r} (data.columns.role; the turn has: "
                            f"{record_keys(turn)})")
        message: Message = {k: v for k, v in turn.items() if k not in (columns.role, columns.content)}
        message["role"] = speaker_role(turn[columns.role], columns.roles, at, hint)
        if columns.content in turn:
            message["content"] = turn[columns.content]
        elif not turn.get("tool_calls"):
            raise DataError(f"{at} has no text field {columns.content!r} (data.columns.content; the turn has: "
                            f"{record_keys(turn)})")
        messages.append(message)
    return messages


def record_keys(record: Any, missing: str | None = None) -> str:
    """A record's field names for an error message (or its type, when it is not an object); with the `missing` field
    a `data.columns` map named, the field spelled like it in another case, since names are matched exactly."""
    if not isinstance(record, Mapping):
        return type(record).__name__
    shown = ", ".join(map(_shown_name, record)) or "none"
    same = [key for key in record if isinstance(key, str) and missing is not None and key != missing
            and key.casefold() == missing.casefold()]
    return shown + (f"; did you mean {same[0]!r}? data.columns names are matched exactly, case included" if same else "")


def _shown_name(key: Any) -> str:
    """A field name as written, or quoted when spaces around it or unprintable characters would not show."""
    name = str(key)
    return name if name and name == name.strip() and name.isprintable() else json.dumps(name)
