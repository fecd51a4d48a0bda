"""Records read into conversations (the reading itself: `data/files.py`), with errors that name the file and line.

Accepted: chat JSONL (`{"messages": [{"role", "content"}, ...]}`, OpenAI style, content a string
or a list of `{"type": "text", "text"}` parts; an assistant message with `"weight": 0` is context,
not trained on, as in axolotl, and one with axolotl's `train_detail` is trained on the parts it marks; tool use:
assistant `tool_calls`, `tool` messages and a record-level `tools` list, as TRL reads them), ShareGPT
(`{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}`, optional `system`; LLaMA-Factory's
`function_call` / `observation` turns and `tools`), TRL's prompt-completion (`prompt` + `completion`, both
strings or both message lists; only the completion is trained on), alpaca JSON/JSONL (`instruction`, `input`,
`output`, optional `system` and `history`), one-turn pairs
with common field names (`question` + `answer`, Dolly's `instruction` + `response`, ...: `data/columns.py`),
plain text (`.txt` files, or records with a `text` field), CSV / TSV and Parquet with those columns (all but
Parquet also gzip'd: `train.jsonl.gz`); the same
records from a Hub dataset (`hf:OWNER/NAME`) or a `save_to_disk` folder (`data/hub.py`). Records with other
field names are read through the recipe's `data.columns` map.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from peftkit.data.columns import (ROLE_ALIASES, SYSTEM_FIELDS, detected_pair, detected_pair_messages, mapped_messages,
                                  mapped_text, number_as_text, pair_messages, record_keys, type_name)
from peftkit.data.files import ARROW_MERGED_FIELDS, BadJsonLines, data_sources, read_records
from peftkit.errors import DataError
from peftkit.utils.once import remembered, say_once
from peftkit.utils.yaml_flow import flow_yaml

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from peftkit.config.schema import ColumnsConfig

Message = dict[str, Any]
"""`role` and `content` strings; an assistant message may carry `weight: 0` (not trained on), `train_detail`
(`((begin, end_exclusive, train), ...)`: which characters of `content` are trained) and `tool_calls`
(`[{"type": "function", "function": {"name", "arguments": {...}}}]`, the form chat templates read); a `tool`
message may carry `name` and `tool_call_id`."""
TrainDetail = tuple[tuple[int, int, bool], ...]
"""axolotl's per-message `train_detail` as (begin, end exclusive, train) character ranges of the content."""
ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED_PROBLEMS = 5
"""Bad records listed in one data error (the rest are counted)."""
COLUMNS_ADVICE = "for other field names add a map to the recipe, e.g. `data: {columns: {prompt: q, response: a}}`"
"""Advice that suits data.train / data.eval; replay files replace it (data.columns does not apply to them)."""
ROLES_ADVICE = " (or map other speakers with data.columns"
"""How each unknown-speaker message's advice starts (roles_advice); replay files replace it from there to the end
(data/replay.py): the recipe's columns do not apply to them."""


def roles_advice(speaker: Any, field: str | None, role_key: str = "role", content_key: str = "content",
                 after: str | None = None) -> str:
    """The whole `data.columns` map that reads a conversation under `field` with another speaker name: `roles`
    describes the turns of a conversation field, so the field and its keys are named too (`roles` alone is refused).
    Without a field (prompt/completion message lists, a mapped record) only where to map speakers. The speaker is
    mapped to the role its place calls for: `assistant` after a user or tool turn (`after`), else `user`."""
    if field is None:
        return ROLES_ADVICE + ".roles)"
    columns: dict[str, Any] = {"messages": field}
    columns |= {"role": role_key, "content": content_key} if (role_key, content_key) != ("role", "content") else {}
    columns["roles"] = {str(speaker): "assistant" if after in ("user", "tool") else "user"}
    return f"{ROLES_ADVICE}: `data.columns: {flow_yaml(columns)}`, each name to user, assistant, system or tool)"


def _misspelt(speaker: Any) -> str:
    """` (did you mean 'gpt'?)` where an unknown speaker name is a slip of the keys from one peftkit reads: a letter
    missing, extra or two swapped, a wrong letter in a name of four or more, two slips in one of eight or more. Not
    `robot` or `Bob` for `bot`: speaker names of their own, to map."""
    name = str(speaker).lower()

    def slip(alias: str) -> bool:
        edits = _edits(name, alias)
        if edits == 0 or len(name) < 3:
            return False
        if len(name) >= 8:
            return edits <= 2
        return edits == 1 and (len(name) >= 4 or len(name) != len(alias) or sorted(name) == sorted(alias))

    close = sorted((alias for alias in ROLE_ALIASES if slip(alias)), key=lambda alias: _edits(name, alias))
    return f" (did you mean {close[0]!r}?)" if close else ""


def _key_slips(obj: Any, expected: tuple[str, ...]) -> str:
    """` (it has `valu`: did you mean `value`?)` for keys of `obj` one or two slips away from a missing expected key."""
    if not isinstance(obj, dict):
        return ""
    slips = [(str(key), name) for name in expected if name not in obj for key in obj
             if len(str(key)) >= 3 and 0 < _edits(str(key).lower(), name) <= (1 if len(name) < 6 else 2)]
    return "".join(f" (it has `{key}`: did you mean `{name}`?)" for key, name in slips[:2])


def _edits(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions and swaps of neighbours."""
    rows = [list(range(len(b) + 1))]
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            row[j] = min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


_CONVERSATION_ADVICE = re.compile(r"`[^`]+` holds a list of objects, a conversation with other field names: .*?maps "
                                  r"speaker names to user / assistant\)", re.DOTALL)


def has_columns_advice(message: str) -> bool:
    """Whether a data error ends in advice to add a `data.columns` map (the record is in no known layout)."""
    return COLUMNS_ADVICE in message or _CONVERSATION_ADVICE.search(message) is not None


def with_columns_advice_replaced(message: str, replacement: str) -> str:
    """`message` with its `data.columns` advice replaced, for files data.columns does not read (replay files)."""
    return _CONVERSATION_ADVICE.sub(replacement, message.replace(COLUMNS_ADVICE, replacement))


@dataclass(frozen=True)
class Example:
    """One training example: a conversation, or raw text trained on every token."""

    where: str
    """`file:line`, for error messages."""
    messages: tuple[Message, ...] | None = None
    text: str | None = None
    tools: tuple[dict[str, Any], ...] | None = None
    """Function schemas the conversation may call (passed to the chat template as `tools`)."""
    format: str = ""
    """The record format it was read as (chat, sharegpt, prompt_completion, alpaca, text), shown by validate."""


def detect_format(record: Any) -> Literal["chat", "sharegpt", "prompt_completion", "alpaca", "pair", "text"] | None:
    if not isinstance(record, dict):
        return None
    # A null field counts as absent (pandas, Arrow and `datasets` write every column on every row), unless the
    # record is nothing without it: then its format is named, and the null refused as such
    present = {key: value for key, value in record.items() if value is not None}
    found, full = _detected_format(present), _detected_format(record)
    # A null `instruction` beside an `input` reads as input -> output (alpaca joins the two, so the same prompt), but
    # with the input empty too, the field to fill in is the instruction
    if full == "alpaca" and found == "pair" and not (isinstance(record.get("input"), str) and record["input"].strip()):
        return full
    return found or full


def _detected_format(record: dict[str, Any]) -> Literal["chat", "sharegpt", "prompt_completion", "alpaca", "pair", "text"] | None:
    if "messages" in record:
        return "chat"
    if "conversations" in record or isinstance(record.get("conversation"), list):  # LMSYS-Chat / WildChat: `conversation`
        return "sharegpt"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if detected_pair(record):
        return "pair"
    if "text" in record:
        return "text"
    return None


_warned_topics: set[str] = remembered(set())


def _warn_first(topic: str, message: str) -> None:
    """Warn of the first finding of a kind in a command (a data file may hold thousands of them)."""
    if topic not in _warned_topics and log.isEnabledFor(logging.WARNING):
        _warned_topics.add(topic)
        log.warning("%s", message)


def message_text(content: Any, where: str) -> str:
    """A message's text: a string, or a list of content parts (OpenAI / TRL conversational style)
    whose `text` parts are joined by line breaks, as vLLM's OpenAI server joins them for a template that takes
    strings (so that the adapter serves on the text it trained on); image, audio or other parts have no meaning for a
    text model. A number is the text it spells, as in alpaca and question/answer records (said once: in a chat
    message it is more often a data mistake than an answer)."""
    if isinstance(content, (int, float)) and not isinstance(content, bool):
        _warn_first("numeric message content", f"{where}: the content is the number {number_as_text(content)}, not a "
                    f"string (the first such message); it is trained as the text {number_as_text(content)!r}: if that "
                    "is meant, write it in quotes, else fix the record")
    content = number_as_text(content)
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            kind = part.get("type", "text") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                found = repr(kind) if kind else type(part).__name__
                raise DataError(f"{where}: content part {found} is not text; peftkit trains text-only models, "
                                "so keep `{\"type\": \"text\", \"text\": ...}` parts only or write the content as a string")
            texts.append(part["text"])
        return "\n".join(texts)
    raise DataError(f"{where}: content must be a string or a list of {{\"type\": \"text\", \"text\": ...}} parts, "
                    f"got {type_name(content)}")


def _json_value(value: Any, what: str, where: str) -> Any:
    """`value`, or the JSON it spells when it is a string (datasets often store tool schemas and calls as JSON text)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: {what} is a string but not valid JSON ({exc.msg}); write it as a JSON object "
                        "or list") from None


def tool_calls_of(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's tool calls in the form chat templates read: `{"type": "function", "function":
    {"name", "arguments": {...}}}` each. Accepts OpenAI's form (arguments as a JSON string) and the flat
    `{"name", "arguments"}` of LLaMA-Factory / Glaive, one call or a list."""
    value = _json_value(value, "`tool_calls`", where)
    calls = [value] if isinstance(value, dict) else value
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{where}: `tool_calls` must be a non-empty list of {{\"type\": \"function\", \"function\": "
                        "{\"name\", \"arguments\"}} objects")
    normalised = []
    for n, call in enumerate(calls, start=1):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise DataError(f"{where}: tool call {n} needs a function `name` (`{{\"type\": \"function\", \"function\": "
                            "{\"name\": ..., \"arguments\": {...}}}`)")
        arguments = _json_value(function.get("arguments", {}), f"tool call {n}'s `arguments`", where)
        if not isinstance(arguments, dict):
            raise DataError(f"{where}: tool call {n}'s `arguments` must be a JSON object of parameter values")
        entry: dict[str, Any] = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        normalised.append(entry)
    return normalised


def tools_of(value: Any, where: str) -> tuple[dict[str, Any], ...] | None:
    """A record's `tools`: function schemas (`{"type": "function", "function": {"name", "description",
    "parameters"}}` or the bare function object, wrapped so: chat templates read `tool.function`), a list or its
    JSON text; empty or absent is None."""
    if value is None or (isinstance(value, str) and not value.strip()):  # Hub columns leave it "" where unused
        return None
    value = _json_value(value, "`tools`", where)
    if value == []:
        return None
    tools = [value] if isinstance(value, dict) else value
    if not isinstance(tools, list):
        raise DataError(f"{where}: `tools` must be a list of function schemas (or their JSON text)")
    for n, tool in enumerate(tools, start=1):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(f"{where}: tool {n} in `tools` needs a `name` (a JSON schema like "
                            "{\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": {...}}})")
    return tuple(tool if "function" in tool else {"type": "function", "function": tool} for tool in tools)


def message_calls(message: Any, where: str) -> Any:
    """A message's tool calls: `tool_calls`, or OpenAI's legacy single `function_call` (`{"name", "arguments"}`,
    read as one call of the same function)."""
    if not isinstance(message, dict):
        return None
    if message.get("function_call") is None:
        return message.get("tool_calls")
    if message.get("tool_calls"):
        raise DataError(f"{where}: the message has both `tool_calls` and the legacy `function_call`; keep "
                        "`tool_calls` (a list of {\"type\": \"function\", \"function\": {\"name\", \"arguments\"}})")
    return message["function_call"]


def record_tools(record: dict[str, Any], where: str) -> tuple[dict[str, Any], ...] | None:
    """A record's `tools`, or OpenAI's legacy `functions` list (bare function schemas) read as tools."""
    functions = record.get("functions")
    if functions is None or (isinstance(functions, str) and not functions.strip()) or functions == []:
        return tools_of(record.get("tools"), where)
    if tools_of(record.get("tools"), where):
        raise DataError(f"{where}: the record has both `tools` and the legacy `functions`; keep `tools` (a list of "
                        "{\"type\": \"function\", \"function\": {schema}})")
    functions = _json_value(functions, "`functions`", where)
    if not isinstance(functions, list):
        raise DataError(f"{where}: `functions` must be a list of function schemas ({{\"name\", \"parameters\"}}); "
                        "or write them as `tools`")
    return tools_of(functions, where)


def read_tools(path: str) -> tuple[dict[str, Any], ...] | None:
    """`--tools FILE`: a JSON list of function schemas, or records with `tools` or OpenAI's legacy `functions` (the
    training data: the first record's are used, read as training reads them)."""
    if Path(path).is_dir():
        raise DataError(f"--tools {path} is a folder; pass one JSON file of function schemas (or a training data file)")
    if not Path(path).is_file():
        raise DataError(f"--tools {path} does not exist (relative to the current directory {Path.cwd()})")
    records = [record for _, record in read_records(path)]
    if records and isinstance(records[0], dict) and ("messages" in records[0] or "conversations" in records[0]
                                                     or "tools" in records[0] or "functions" in records[0]):
        # training data: the first record with tools (a conversation without any comes first in many files)
        tools = next((found for record in records if isinstance(record, dict)
                      and (found := record_tools(record, f"--tools {path}"))), None)
    else:
        tools = tools_of(records, f"--tools {path}")
    if tools is None:  # an empty file or list would chat as if the flag were not given
        raise DataError(f"--tools {path} holds no function schemas; write a JSON list of them "
                        "([{\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": {...}}}]) or "
                        "leave out --tools")
    return tools


_NEXT_ROLES = {None: ("user",), "user": ("assistant",), "assistant": ("user",), "tool_calls": ("tool",),
               "tool": ("tool", "assistant")}
"""Which roles may follow each turn (None: the start; `tool_calls`: an assistant turn that calls tools)."""


def _content_key_hint(message: Any, field: str | None) -> str:
    """For a turn of the conversation under `field` with a `role` and its text under one other key (`text`,
    `value`, ...): the map that reads it."""
    if field is None or not isinstance(message, dict) or "role" not in message:
        return ""
    texts = [key for key, value in message.items() if key != "role" and isinstance(value, str)]
    if len(texts) != 1:
        return ""
    return f"; its text is under `{texts[0]}`: `data.columns: {flow_yaml({'messages': field, 'content': texts[0]})}` reads it"


def check_messages(messages: Any, where: str, field: str | None = None) -> tuple[Message, ...]:
    """The conversation checked and normalised; `field`: the record field it was read from (a chat record's
    `messages`), which the advice for other key or speaker names puts in a `data.columns` map."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    checked: list[Message] = []
    for i, message in enumerate(messages):
        if isinstance(message, dict) and "role" not in message:  # `Role` / `Content`, as the record's own keys are read
            message = with_folded_keys(message)
        calls = message_calls(message, f"{where}: message {i + 1}")
        if not isinstance(message, dict) or "role" not in message or ("content" not in message and not calls):
            raise DataError(f"{where}: message {i + 1} must be an object with `role` and `content`"
                            f"{_key_slips(message, ('role', 'content')) or _content_key_hint(message, field)}")
        role, content = message["role"], message.get("content")
        if role not in ROLES:  # `human` / `gpt` / `User` ...: the speaker names ShareGPT data uses
            role = ROLE_ALIASES.get(str(role).lower()) if str(role).lower() != "function_call" else None
        if role is None:
            raise DataError(f"{where}: message {i + 1} has unknown role {message['role']!r}"
                            f"{_misspelt(message['role'])}; use one of {', '.join(ROLES)}"
                            f"{roles_advice(message['role'], field, after=checked[-1]['role'] if checked else None)}")
        content = "" if content is None and calls else message_text(content, f"{where}: message {i + 1}")
        if role == "system" and i != 0:
            raise DataError(f"{where}: a system message may only come first (found at position {i + 1}); merge its "
                            "text into the first message, or drop it")
        entry: Message = {"role": role, "content": content}
        if calls:
            if role != "assistant":
                raise DataError(f"{where}: message {i + 1}: only assistant messages make `tool_calls` (or `function_call`)")
            entry["tool_calls"] = tool_calls_of(calls, f"{where}: message {i + 1}")
        if role == "tool":
            entry |= {k: message[k] for k in ("name", "tool_call_id") if isinstance(message.get(k), str)}
        weight = message.get("weight")  # None: the column exists (Arrow/Parquet rows) but is unset here
        if weight is None and isinstance(message.get("training"), bool):  # axolotl's per-message `training` flag
            weight = int(message["training"]) if role == "assistant" or message["training"] else None
        if weight is not None:  # SlimOrca puts `weight: 0` on every human turn: never trained anyway, so accepted
            if isinstance(weight, str) or weight not in (0, 1):
                raise DataError(f"{where}: message {i + 1}: `weight` (or `training`) must be 0 or 1 (false / true), "
                                f"not {weight!r}")
            if role != "assistant" and weight == 1:
                raise DataError(f"{where}: message {i + 1}: `weight: 1` (or `training: true`) on a {role} message is not "
                                "supported: only assistant turns are trained, so weights go on assistant messages only; "
                                "`data.train_on_prompt: true` trains the prompts too")
            if role == "assistant" and weight == 0:
                entry["weight"] = 0
        detail = train_detail_of(message.get("train_detail"), content, f"{where}: message {i + 1}")
        trains_some = detail is not None and any(train for _b, _e, train in detail)
        if trains_some and role != "assistant":
            raise DataError(f"{where}: message {i + 1}: `train_detail` marks part of a {role} message as trained, which "
                            "is not supported: only assistant turns are trained, so `train: true` goes on assistant "
                            "messages only; `data.train_on_prompt: true` trains the prompts too")
        if detail is not None and role == "assistant" and entry.get("weight", 1):
            if trains_some:
                entry["train_detail"] = detail
            else:  # nothing of the reply is trained: context, as with `weight: 0`
                entry["weight"] = 0
        if role == "user" and not content.strip():
            _warn_first("empty user message", f"{where}: message {i + 1}: a user message is empty (the first such "
                        "one), so the reply after it is trained as an answer to nothing; write the question in, or "
                        "drop the record")
        if role == "assistant" and entry.get("weight", 1) and not content.strip() and not calls:
            raise DataError(f"{where}: message {i + 1}: the assistant reply is empty, and training on it teaches the "
                            "model to answer with nothing; fill it in or drop the record (in chat data, `weight: 0` "
                            "keeps an assistant turn as context only)")
        checked.append(entry)
    previous = None
    for i, message in enumerate(m for m in checked if m["role"] != "system"):
        expected = _NEXT_ROLES[previous]
        if message["role"] not in expected:
            opening = (" A conversation that opens with the assistant's greeting: drop the greeting, or put it in the "
                       "system prompt." if i == 0 and message["role"] == "assistant" else "")
            raise DataError(
                f"{where}: roles out of order: turn {i + 1} is {message['role']!r} but "
                f"{' or '.join(map(repr, expected))} was expected (conversations alternate user, assistant, user, "
                "...; an assistant turn with `tool_calls` is followed by `tool` turns, then the assistant again)."
                + (opening or (f" Two {message['role']} turns in a row: merge them into one message, or drop one."
                               if message["role"] == previous else ""))
            )
        previous = "tool_calls" if message.get("tool_calls") else message["role"]
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in checked):
        context_only = any(m["role"] == "assistant" for m in checked)
        raise DataError(f"{where}: the conversation has no assistant turn to train on, so there is nothing to learn from"
                        + (" (its assistant turns all have `weight: 0`, or a `train_detail` that trains none of "
                           "their text: context only)" if context_only else ""))
    return tuple(checked)


def train_detail_of(value: Any, content: str, where: str) -> TrainDetail | None:
    """axolotl's `train_detail`: `[{"begin_offset", "end_offset", "train"}, ...]`, character offsets into the
    message's content with `end_offset` inclusive, as axolotl reads them (text no entry marks trained is not
    trained). None where absent (also null: an Arrow/Parquet column that this message leaves unset)."""
    if value is None:
        return None
    fix = ("write it as a list of {\"begin_offset\": int, \"end_offset\": int, \"train\": true|false} objects, "
           "offsets counting the content's characters from 0, end_offset inclusive (as in axolotl)")
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: `train_detail` is {type_name(value)}; {fix}")
    detail = []
    for n, entry in enumerate(value, start=1):
        at = f"{where}: `train_detail` entry {n}"
        if not isinstance(entry, dict):
            raise DataError(f"{at} is {type_name(entry)}, not an object; {fix}")
        begin, end, train = entry.get("begin_offset"), entry.get("end_offset"), entry.get("train")
        for key, offset in (("begin_offset", begin), ("end_offset", end)):
            if not isinstance(offset, int) or isinstance(offset, bool):
                raise DataError(f"{at}: `{key}` must be a whole number, not {offset!r}; {fix}")
        if not isinstance(train, bool):
            raise DataError(f"{at}: `train` must be true or false, not {train!r}; {fix}")
        if not 0 <= begin <= end < len(content):
            size = f"{len(content)} characters, so 0..{len(content) - 1} at most" if content else "it is empty"
            raise DataError(f"{at}: offsets {begin}..{end} are not within the content ({size}; end_offset is inclusive "
                            "and not below begin_offset); correct the offsets, or drop the entry")
        detail.append((begin, end + 1, train))
    return tuple(detail)


def sharegpt_messages(record: dict[str, Any], where: str, field: str | None = None) -> list[Message]:
    """ShareGPT turns (`from` / `value`, or already `role` / `content`) as chat messages; `field`: the record field
    they came from, where it is not `conversations` / `conversation` (the advice for other speakers names it)."""
    field = field or ("conversations" if "conversations" in record else "conversation")
    turns = record["conversations"] if "conversations" in record else record.get("conversation")
    turns = _json_value(turns, "`conversations`", where)  # a CSV column holds the JSON text
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: `conversations` must be a non-empty list of {{from, value}} objects")
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        if isinstance(turn, dict) and "from" not in turn and "role" not in turn:  # `From` / `Value`
            turn = with_folded_keys(turn)
        if isinstance(turn, dict) and "role" in turn and "content" in turn:
            messages.append(turn)
            continue
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: conversation turn {i + 1} must be an object with `from` and `value`"
                            f"{_key_slips(turn, ('from', 'value'))}")
        source = str(turn["from"]).lower()
        role = ROLE_ALIASES.get(source)
        if role is None:
            raise DataError(
                f"{where}: conversation turn {i + 1} is from {turn['from']!r}{_misspelt(turn['from'])}; peftkit reads "
                f"{', '.join(sorted(ROLE_ALIASES))} turns"
                f"{roles_advice(turn['from'], field, 'from', 'value', messages[-1]['role'] if messages else None)}"
            )
        if source == "function_call":
            where_turn = f"{where}: conversation turn {i + 1}"
            messages.append({"role": role, "content": "", "tool_calls": tool_calls_of(turn["value"], where_turn)})
        else:
            messages.append({"role": role, "content": turn["value"]})
        for key in ("weight", "training", "train_detail"):  # axolotl's per-turn flags, read as chat messages' are
            if turn.get(key) is not None:
                messages[-1][key] = turn[key]
    return with_record_system(messages, record)


def with_record_system(messages: Any, record: dict[str, Any]) -> Any:
    """A record-level `system` / `system_prompt` string becomes the system turn when the conversation has none
    (a blank one counts as none); a system turn of its own wins, as in LLaMA-Factory."""
    system = next((record[f] for f in SYSTEM_FIELDS if isinstance(record.get(f), str) and record[f].strip()), None)
    if system is None or not isinstance(messages, list) or not messages or not isinstance(messages[0], dict):
        return messages
    if messages[0].get("role") == "system":
        if str(messages[0].get("content") or "").strip():
            return messages
        messages = messages[1:]
    return [{"role": "system", "content": system}, *messages]


def prompt_completion_messages(record: dict[str, Any], where: str) -> list[Message]:
    """TRL's prompt-completion record: strings (one user turn, one reply) or message lists (a
    conversation and its continuation). Assistant turns inside the prompt are context only."""
    prompt, completion = number_as_text(record["prompt"]), number_as_text(record["completion"])
    if isinstance(prompt, str) and isinstance(completion, str):
        return with_record_system([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                                  record)
    if isinstance(prompt, list) and isinstance(completion, list):
        context = [{**m, "weight": 0} if isinstance(m, dict) and m.get("role") == "assistant" else m for m in prompt]
        return with_record_system([*context, *completion], record)
    raise DataError(f"{where}: `prompt` and `completion` must both be strings or both be lists of {{role, content}} "
                    f"messages, got {type_name(prompt)} and {type_name(completion)}")


FORMAT_KEYS = {"chat": ("messages",), "sharegpt": ("conversations", "conversation"), "alpaca": ("instruction",),
               "prompt_completion": ("prompt", "completion"), "text": ("text",)}
"""Fields that show a record is written in a format (its mistake is then its own, not another format's)."""


def to_example(record: Any, where: str, fmt: str, columns: ColumnsConfig | None = None) -> Example:
    if columns is not None and columns.text:  # the recipe names the fields: no detection
        return dataclasses.replace(_to_example({"text": mapped_text(record, columns, where)}, where, "text"), format="columns")
    if columns is not None:
        messages = mapped_messages(record, columns, where)
        tools = record_tools(record, where) if isinstance(record, dict) else None
        return Example(where, messages=check_messages(messages, where), tools=tools, format="columns")
    kind = detect_format(record) if fmt == "auto" else fmt
    if kind is None and fmt == "auto" and detect_format(with_folded_keys(record)) is not None:
        record = with_folded_keys(record)
        kind = detect_format(record)
    if kind == "prompt_completion" and isinstance(record.get("label"), bool):
        raise DataError(f"{where}: a KTO record (prompt, completion, label) marks its completion good or bad, which "
                        "peftkit does not train on: every completion would be trained as a good answer, the label: "
                        "false ones too; keep the label: true records (`jq -c 'select(.label == true) | del(.label)'`)")
    if kind == "text" and isinstance(record, dict) and record.get("label") is not None:
        say_once(log, logging.WARNING, f"{where.rsplit(':', 1)[0]}: records hold a `label` beside their `text`, which "
                 "a chat recipe trains as plain text, the label ignored; for a classifier set `task: "
                 "sequence_classification`")
    try:
        example = _to_example(record, where, kind)
    except DataError as exc:
        detected = detect_format(record) if fmt != "auto" else None
        own = isinstance(record, dict) and any(key in record for key in FORMAT_KEYS.get(fmt, ()))  # null, perhaps
        if detected is None or detected == fmt or own or "set data.format" in str(exc):  # its own mistake, or said
            raise
        shown = f"a {'/'.join(detected_pair(record) or ())} pair" if detected == "pair" else f"in {detected} format"
        raise DataError(f"{exc}; the record is {shown}, which data.format: {fmt} does not read: set data.format to "
                        "auto (or remove it) to read each record in its own format") from None
    if kind == "pair":
        return dataclasses.replace(example, format="/".join(detected_pair(record) or ()))
    return dataclasses.replace(example, format=kind or "")


def with_folded_keys(record: Any) -> Any:
    """`record` with its field names lower-cased and stripped (`Question`, `Answer ` as spreadsheets write them),
    unless two names would then be the same: detection reads those names."""
    if not isinstance(record, dict) or not all(isinstance(key, str) for key in record):
        return record
    folded = {key.strip().lower(): value for key, value in record.items()}
    return folded if len(folded) == len(record) else record


def chat_record_messages(record: dict[str, Any], where: str) -> list[Message]:
    """A chat record's messages: `role`/`content` turns, or ShareGPT's `from`/`value` under `messages`."""
    messages = _json_value(record["messages"], "`messages`", where)  # a CSV column holds the JSON text
    if isinstance(messages, list) and messages and all(isinstance(m, dict) and "from" in m and "role" not in m
                                                       for m in messages):
        messages = sharegpt_messages({"conversations": messages}, where, field="messages")
    return with_record_system(messages, record)


def _to_example(record: Any, where: str, kind: str | None) -> Example:
    if kind is None and not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object (one record), got {type_name(record)}"
                        + ("; a .jsonl line or an item of a .json list is one record object, or one conversation "
                           "written as a list of {\"role\", \"content\"} messages" if isinstance(record, list) else ""))
    if kind is None:
        keys = record_keys(record)
        if isinstance(record, dict) and "chosen" in record and "rejected" in record:
            raise DataError(f"{where}: a preference record (keys: {keys}) is for DPO-style training, which peftkit does "
                            "not do; to fine-tune on the preferred answers map them: `data: {columns: {prompt: prompt, "
                            "response: chosen}}` (or `{messages: chosen}` when `chosen` holds the whole conversation)")
        if isinstance(record, dict) and "preferred_output" in record and "non_preferred_output" in record:
            raise DataError(f"{where}: an OpenAI preference record (keys: {keys}) is for DPO-style training, which "
                            "peftkit does not do; to fine-tune on the preferred answers write each record as one "
                            "conversation: `jq -c '{messages: (.input.messages + .preferred_output)}'`")
        if isinstance(record, dict) and "key_fact" in with_folded_keys(record):
            raise DataError(f"{where}: a held-out question (keys: {keys}): records with a `key_fact` are what "
                            "`data.heldout` (and `peftkit eval --heldout`) ask the model to score its answers, not "
                            "data to train or measure the loss on; name this file under data.heldout")
        raise DataError(
            f"{where}: unrecognised record (keys: {keys}); expected `messages` (chat), `conversations` (ShareGPT), "
            "`prompt` + `completion`, `instruction` + `output` (alpaca), a pair such as `question` + `answer`, or "
            f"`text`; {conversation_advice(record) or COLUMNS_ADVICE}"
        )
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type_name(record)}")
    required = {"chat": ("messages",), "sharegpt": ("conversations",), "prompt_completion": ("prompt", "completion")}
    missing = [k for k in required.get(kind, ()) if k not in record and not (k == "conversations" and "conversation" in record)]
    if missing:
        raise DataError(f"{where}: record has no {' / '.join(f'`{k}`' for k in missing)} (data.format is {kind})")
    if kind in ("chat", "sharegpt", "prompt_completion"):
        if kind == "chat":
            messages = chat_record_messages(record, where)
        elif kind == "sharegpt":
            messages = sharegpt_messages(record, where)
        else:
            messages = prompt_completion_messages(record, where)
        field = {"chat": "messages", "sharegpt": "conversations" if "conversations" in record else "conversation"}
        return Example(where, messages=check_messages(messages, where, field.get(kind)), tools=record_tools(record, where))
    if kind == "pair":  # ChatGLM / Qwen fine-tuning data: `prompt` / `query` + `response` with the same `history`
        messages = detected_pair_messages(record, where)
        system = messages[:1] if messages[0]["role"] == "system" else []
        history = alpaca_history(record.get("history"), where)
        return Example(where, messages=check_messages([*system, *history, *messages[len(system):]], where))
    if kind == "alpaca":
        messages = pair_messages(record, where, "instruction", "output", context="input")
        history = alpaca_history(record.get("history"), where)
        return Example(where, messages=check_messages(with_record_system([*history, *messages], record), where))
    text = record.get("text")
    if "text" not in record:
        raise DataError(f"{where}: read as plain text (data.format: text), but the record has no `text` field (its "
                        f"fields: {record_keys(record)}); set data.format to the records' format (or auto), or map "
                        "the field: `data: {columns: {text: FIELD}}`")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: `text` must be a non-empty string")
    return Example(where, text=text)


ROLE_KEYS = ("role", "from", "speaker", "author", "sender", "who")
CONTENT_KEYS = ("content", "value", "text", "message", "utterance", "body", "msg")
"""The keys a turn of a conversation names its speaker and its text with, in other tools' layouts."""


def conversation_advice(record: dict[str, Any]) -> str | None:
    """The `data.columns` map of a conversation under another key with other turn keys (axolotl's custom
    `field_messages` / `message_property_mappings`), for a record holding a list of objects; None for others,
    whose one-turn example (COLUMNS_ADVICE) fits better, turns written as user / reply pairs
    (`[{"user": "hi", "bot": "hello"}]`: no key names a speaker or a text) among them."""
    field, turns = next(((k, v) for k, v in record.items() if k not in ARROW_MERGED_FIELDS and isinstance(v, list)
                         and v and all(isinstance(t, dict) for t in v)), (None, None))
    if field is None or turns is None:
        return None
    keys = [k for k in turns[0] if isinstance(turns[0][k], str)]
    named_roles = [k for k in keys if k not in CONTENT_KEYS and all(  # a key whose values are all role names
        isinstance(t.get(k), str) and t[k].lower() in ROLE_ALIASES for t in turns)]
    role = next(iter(named_roles), next((k for k in ROLE_KEYS if k in keys), None))
    content = next((k for k in CONTENT_KEYS if k in keys and k != role), None)
    if role is None and content is None:
        return None
    role = role or next((k for k in keys if k != content), "ROLE_KEY")
    content = content or next((k for k in keys if k != role), "TEXT_KEY")
    speakers = list(dict.fromkeys(t[role] for t in turns if isinstance(t.get(role), str)))
    known = {ROLE_ALIASES.get(s.lower()) for s in speakers}
    unknown = [s for s in speakers if s.lower() not in ROLE_ALIASES]
    guesses = dict(zip(unknown, [r for r in ("user", "assistant") if r not in known]))
    mapped: dict[str, Any] = {"messages": field, **{name: key for name, key in (("role", role), ("content", content))
                                                     if key != name}}
    if guesses:
        mapped["roles"] = guesses
    return (f"`{field}` holds a list of objects, a conversation with other field names: map it in the recipe, e.g. "
            f"`data: {flow_yaml({'columns': mapped})}` (`role` / `content` name each turn's speaker and text keys, "
            "`roles` maps speaker names to user / assistant)")


def alpaca_history(history: Any, where: str) -> list[Message]:
    """LLaMA-Factory's alpaca `history` (and ChatGLM's / Qwen's beside `prompt` or `query` + `response`): the earlier
    `[user, assistant]` pairs of the conversation, trained like every assistant turn of a chat record."""
    if history is None or history == "" or history == []:
        return []
    history = _json_value(history, "`history`", where)
    if not isinstance(history, list) or not all(isinstance(pair, list) and len(pair) == 2
                                                and all(isinstance(text, str) for text in pair) for pair in history):
        raise DataError(f"{where}: `history` must be a list of [instruction, response] string pairs (the earlier user and "
                        "assistant turns)")
    return [message for query, response in history
            for message in ({"role": "user", "content": query}, {"role": "assistant", "content": response})]


def _check_unicode(value: Any, where: str) -> None:
    """JSON can spell half of a surrogate pair (`"\\ud800"`), which no UTF-8 text holds: tokenizers reject
    such a string with a bare TypeError, so name the record instead."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataError(f"{where}: invalid unicode (lone surrogate U+{ord(value[exc.start]):04X}, written "
                            "`\\u` + 4 hex digits without its pair); fix the escape or drop the record") from None
    elif isinstance(value, dict):
        for item in value.values():
            _check_unicode(item, where)
    elif isinstance(value, list):
        for item in value:
            _check_unicode(item, where)


def load_examples(source: str | Path | Sequence[str | Path], fmt: str = "auto",
                  columns: ColumnsConfig | None = None,
                  prepare: Callable[[Any, str], Any] | None = None, *, mapped_elsewhere: bool = False) -> list[Example]:
    """Conversations (or texts) from a data file, a Hub dataset `hf:OWNER/NAME[/CONFIG][:SPLIT]`
    or a `datasets` `save_to_disk` folder; from a list of them, all in order. `columns` (the recipe's
    `data.columns`) names the fields of records that use other names; `prepare(record, where)` may
    rewrite each raw record first (or raise DataError for it).

    Each source of a list is in its own format: one the map fits no record of, in a list where it fits another
    source (or `mapped_elsewhere`: it fits the recipe's training data, and this is its eval data), is read in its
    detected format where it has one. A single source is always read with the map: a misspelt field is an error."""
    sources = data_sources(source)
    read: dict[int, list[Example]] = {}
    failed: dict[int, str] = {}  # one message per file: a list of files is checked whole, not up to its first mistake
    unmapped: list[int] = []  # sources the map fits no record of
    for i, one in enumerate(sources):
        try:
            found, problems, unreadable = _mapped_records(one, fmt, columns, prepare)
        except DataError as exc:
            failed[i] = str(exc)
            continue
        if problems or unreadable:  # lines that are not JSON, and the other lines' problems: all in one round
            failed[i] = "\n".join([*([unreadable] if unreadable else []),
                                   *([str(bad_records_error(one, problems, len(found)))] if problems else [])])
            unmapped += [i] if problems and not found and not unreadable else []
        elif not found:
            failed[i] = f"data {one} contains no examples"
        else:
            read[i] = found
    if columns is not None and (read or mapped_elsewhere):
        for i in unmapped:
            detected = _read_as_detected(sources[i], prepare)
            if detected:
                read[i] = detected
                del failed[i]
                say_once(log, logging.INFO, f"{sources[i]}: no record has the fields data.columns names, so it was "
                         f"read in its own {detected[0].format} format (the map reads the recipe's other data)")
    if failed:
        raise DataError("\n".join(failed[i] for i in sorted(failed)))
    return [example for i in sorted(read) for example in read[i]]


_THIS_ONE = re.compile(r" \(this one: [^()]*\)")
"""The record's own field names in a message (`(this one: conversations, system)`): set aside to see a shared reason."""


def bad_records_error(source: str | Path, problems: list[tuple[str, str]], good: int) -> DataError:
    """One error for all of a file's bad records (`problems`: where and message, each), so that one round of fixes
    clears them: a reason all share said once, else the first few named."""
    messages = [message for _, message in problems]
    reasons = {message.removeprefix(f"{where}: ") for where, message in problems}
    if len(reasons) > 1 and len({_THIS_ONE.sub("", r) for r in reasons}) == 1:  # only each record's own keys differ
        reasons = {_THIS_ONE.sub("", messages[0].removeprefix(f"{problems[0][0]}: "))}
        messages = [_THIS_ONE.sub("", m) for m in messages]
    if len(problems) > 1 and len(reasons) == 1:  # e.g. a misnamed column: say it once
        reason = reasons.pop()
        which = f"all {len(problems)} records" if not good else f"{len(problems)} of {len(problems) + good} records"
        return DataError(f"{which} of {source} (first: {messages[0].removesuffix(': ' + reason)}): {reason}")
    shown = messages[:MAX_REPORTED_PROBLEMS]
    more = f"\n  ... and {len(messages) - len(shown)} more" if len(messages) > len(shown) else ""
    return DataError(shown[0] if len(messages) == 1 else
                     f"{len(messages)} records of {source} need fixing:\n  " + "\n  ".join(shown) + more)


def _mapped_records(one: str | Path, fmt: str, columns: ColumnsConfig | None, prepare: Callable[[Any, str], Any] | None
                    ) -> tuple[list[Example], list[tuple[str, str]], str | None]:
    """The examples of `one` as `fmt` / `columns` read them, the records they do not read (where, why), and what
    says which lines are not JSON at all (None when all are)."""
    found, problems = [], []
    try:
        records, unreadable = read_records(one), None
    except BadJsonLines as exc:
        records, unreadable = exc.records, str(exc)
    for where, record in records:
        try:
            _check_unicode(record, where)
            found.append(to_example(prepare(record, where) if prepare else record, where, fmt, columns))
        except DataError as exc:  # go on: one message lists the first few bad records, not just one
            problems.append((where, str(exc)))
    return found, problems, unreadable


def _read_as_detected(one: str | Path, prepare: Callable[[Any, str], Any] | None) -> list[Example] | None:
    """Every record of `one` in its detected format, or None where any of them is not in one."""
    found = []
    try:
        for where, record in read_records(one):
            _check_unicode(record, where)
            found.append(to_example(prepare(record, where) if prepare else record, where, "auto", None))
    except DataError:
        return None
    return found
