"""Read training files into conversations, with errors that name the file and line.

Accepted: chat JSONL (`{"messages": [{"role", "content"}, ...]}`, OpenAI style), alpaca
JSON/JSONL (`instruction`, `input`, `output`, optional `system`), plain text (`.txt` files,
or records with a `text` field), CSV and Parquet with those columns.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from peftkit.errors import DataError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One training example: a conversation, or raw text trained on every token."""

    where: str
    """`file:line`, for error messages."""
    messages: tuple[Message, ...] | None = None
    text: str | None = None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: bytes that are not valid UTF-8 (offset {exc.start}); re-save the file as UTF-8") from None


def read_records(path: Path) -> list[tuple[str, Any]]:
    """Raw records with their `file:line` location."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist (paths in a recipe are relative to the recipe's folder)")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return [(f"{path}:row {i + 1}", row) for i, row in enumerate(rows)]
    text = _read_text(path)
    if suffix == ".txt":
        chunks = [c.strip() for c in text.split("\n\n")]
        return [(f"{path}:chunk {i + 1}", {"text": c}) for i, c in enumerate(chunks) if c]
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        return [(f"{path}:{i + 2}", row) for i, row in enumerate(reader)]
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if isinstance(data, dict):
            data = data.get("data") or data.get("examples") or [data]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records")
        return [(f"{path}:item {i + 1}", row) for i, row in enumerate(data)]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{number}: line is not valid JSON ({exc.msg} at column {exc.colno}); "
                "each line of a .jsonl file must be one JSON object"
            ) from None
    return records


def detect_format(record: Any) -> Literal["chat", "alpaca", "text"] | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def check_messages(messages: Any, where: str) -> tuple[Message, ...]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    checked: list[Message] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {i + 1} must be an object with `role` and `content`")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{where}: message {i + 1} has unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i + 1} content must be a string")
        if role == "system" and i != 0:
            raise DataError(f"{where}: a system message may only come first (found at position {i + 1})")
        checked.append({"role": role, "content": content})
    turns = [m["role"] for m in checked if m["role"] != "system"]
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(
                f"{where}: roles out of order: turn {i + 1} is {role!r} but {expected!r} was expected "
                "(conversations alternate user, assistant, user, ...)"
            )
    if "assistant" not in turns:
        raise DataError(f"{where}: the conversation has no assistant turn, so there is nothing to learn from")
    return tuple(checked)


def to_example(record: Any, where: str, fmt: str) -> Example:
    kind = detect_format(record) if fmt == "auto" else fmt
    if kind is None:
        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(
            f"{where}: unrecognised record (keys: {keys}); expected `messages` (chat), "
            "`instruction` + `output` (alpaca) or `text`"
        )
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if kind == "chat":
        if "messages" not in record:
            raise DataError(f"{where}: record has no `messages` list (data.format is chat)")
        return Example(where, messages=check_messages(record["messages"], where))
    if kind == "alpaca":
        missing = [k for k in ("instruction", "output") if not isinstance(record.get(k), str)]
        if missing:
            raise DataError(f"{where}: alpaca record needs string fields {', '.join(missing)}")
        prompt = record["instruction"]
        if record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": record["system"]})
        return Example(where, messages=tuple(messages))
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: `text` must be a non-empty string")
    return Example(where, text=text)


def load_examples(path: str | Path, fmt: str = "auto") -> list[Example]:
    path = Path(path)
    examples = [to_example(record, where, fmt) for where, record in read_records(path)]
    if not examples:
        raise DataError(f"data file {path} contains no examples")
    return examples
