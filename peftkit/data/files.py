"""Data sources read into raw records, each with the `file:line` (or `file:item N`, `file:row N`) it came from.

JSON Lines (also `.ndjson` or no suffix), JSON documents (a list, or an object wrapping one), CSV / TSV, Parquet and
plain text (`.txt`, in blank-line-separated chunks), all but Parquet also gzip'd; a Hub dataset (`hf:OWNER/NAME`) or a
`save_to_disk` folder through `data/hub.py`; path patterns (`data/*.jsonl`) as the files they match. Reading knows
nothing of record formats: `data/formats.py` turns the records into conversations.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import logging
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from peftkit.data.columns import ROLE_ALIASES, WrittenFloat
from peftkit.errors import DataError
from peftkit.utils.once import say_once
from peftkit.utils.yaml_flow import flow_yaml

log = logging.getLogger(__name__)


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt")
JSONL_SUFFIXES = ("", ".ndjson")
"""Other names of JSON Lines files."""


def _non_finite_as_null(constant: str) -> None:
    """`NaN` / `Infinity` in a JSON file (Python's json.dumps writes a pandas missing cell so): a missing value,
    as null is, not the text "nan" trained as an answer."""
    return None


def _parse_json(text: str) -> Any:
    return json.loads(text, parse_constant=_non_finite_as_null, parse_float=WrittenFloat)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A file the user may not read as a DataError naming it, so that `validate` lists it with every other file's
    problems instead of stopping at a bare PermissionError."""
    try:
        yield
    except PermissionError:
        raise DataError(f"{path}: cannot read it: permission denied; check its permissions (e.g. `chmod a+r "
                        f"{path}`, or ask its owner to)") from None


GZIP_MAGIC = b"\x1f\x8b"
"""The first two bytes of every gzip file."""


def _read_text(path: Path) -> str:
    """The file's text, gunzipped for `.gz` (or a gzip file under another name: its first bytes say so, and no UTF-8
    text starts with them); a leading UTF-8 byte-order mark (Notepad, Excel's "CSV UTF-8") is dropped."""
    with _reading(path):
        data = path.read_bytes()
    inside = ""
    if path.suffix.lower() == ".gz" or data.startswith(GZIP_MAGIC):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; a cut-off file is an EOFError
            raise DataError(f"{path}: not a readable gzip file ({exc or 'it ends too early'}); check that the "
                            "download or copy is complete, or give the uncompressed file") from None
        inside = " of the decompressed text"
    for marks, encoding in (((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"), "utf-32"), ((b"\xff\xfe", b"\xfe\xff"), "utf-16")):
        if data.startswith(marks):  # UTF-16 (Windows PowerShell's `>` writes it) or UTF-32, with its byte-order mark
            try:
                return data.decode(encoding)
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}: the text{inside} starts with a {encoding.upper()} byte-order mark but is not "
                                f"valid {encoding.upper()} (offset {exc.start}); re-save the file as UTF-8") from None
    utf16 = data[:200].count(b"\x00") * 3 > len(data[:200]) > 0  # ASCII in UTF-16: every other byte is 0
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: bytes that are not valid UTF-8 (offset {exc.start}{inside})"
                        + ("; it looks like UTF-16 text without a byte-order mark" if utf16 else "")
                        + "; re-save the file as UTF-8") from None
    if utf16:  # valid UTF-8 all the same (NUL is a character): every line would fail as JSON or be trained with NULs
        raise DataError(f"{path}: the text{inside} is UTF-16 without a byte-order mark (every other byte is 0); "
                        "re-save the file as UTF-8")
    return text


GZIP_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".ndjson")
"""Inner suffixes of gzip'd files read directly, as `datasets`, axolotl and TRL read them (Parquet compresses itself)."""


def data_suffix(path: Path) -> str:
    """The suffix that says how to read `path`: `train.jsonl.gz` reads as `.jsonl`, `train.parquet.gz` as
    `.parquet.gz` (refused)."""
    suffix = path.suffix.lower()
    if suffix != ".gz":
        return suffix
    inner = Path(path.stem).suffix.lower()
    return inner if inner in GZIP_SUFFIXES else inner + suffix


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def _split_files(found: list[str]) -> tuple[str, str] | None:
    """Patterns for a folder's training files and its held-out ones (`validation` / `dev` / `eval` in the name, else
    `test`), when its files are named by split; else None."""
    def split_of(name: str) -> str | None:
        stem = Path(name).name.lower()
        return next((split for split, words in (("train", ("train",)), ("eval", ("validation", "valid", "val", "dev", "eval")),
                                                 ("test", ("test",)))
                     if any(re.match(rf"{word}(?![a-z])", stem) for word in words)), None)

    by_split: dict[str, list[str]] = {}
    for name in found:
        by_split.setdefault(split_of(name) or "", []).append(name)
    held = by_split.get("eval") or by_split.get("test")  # a validation split measures training; the test split is
    if not by_split.get("train") or not held:  # kept for the end
        return None

    def pattern(names: list[str]) -> str:
        if len(names) == 1:
            return names[0]
        folder, suffix = str(Path(names[0]).parent), data_suffix(Path(names[0]))
        stem = Path(names[0]).name.split("-")[0].split("_")[0].split(".")[0]
        return f"{'' if folder == '.' else folder + '/'}{stem}*{suffix}"

    return pattern(by_split["train"]), pattern(held)


def looks_like_hub_id(written: str) -> bool:
    """`OWNER/NAME` as axolotl and LLaMA-Factory users write a Hub dataset: one slash, no data-file suffix."""
    return (_HUB_ID.fullmatch(written) is not None
            and data_suffix(Path(written)) not in (*DATA_SUFFIXES, *GZIP_SUFFIXES, ".gz", ".parquet.gz"))


def hub_id_hint(path: Path) -> str:
    """For a missing `OWNER/NAME` (one folder level that does not exist): the `hf:` spelling of a Hub dataset. The
    recipe folder was joined on, so look at the last two parts; `data/train.jsonl` gets no hint."""
    written = "/".join(path.parts[-2:])
    if len(path.parts) < 2 or not looks_like_hub_id(written) or path.parent.exists() or not path.parent.parent.exists():
        return ""
    return f"; for a Hugging Face Hub dataset write `hf:{written}`"


def read_records(source: str | Path) -> list[tuple[str, Any]]:
    """Raw records with their `file:line` location, from a file, a Hub dataset (`hf:OWNER/NAME`)
    or a `datasets` `save_to_disk` folder."""
    from peftkit.data import hub

    if hub.is_hub_ref(source):
        return _arrow_records(hub.hub_records(str(source)))
    path = Path(source)
    if path.is_dir() and hub.is_saved_dataset(path):
        return _arrow_records(hub.saved_dataset_records(path))
    if path.is_dir():
        found = sorted(str(p.relative_to(path)) for p in path.rglob("*") if data_suffix(p) in DATA_SUFFIXES)
        hint = f"; it holds {', '.join(found[:5])}{' ...' if len(found) > 5 else ''}" if found else ""
        suffixes = sorted({data_suffix(Path(f)) for f in found})
        deep = "**/" if any(Path(f).parent != Path(".") for f in found) else ""  # some only in subfolders
        pattern = f"{path}/{deep}*{suffixes[0]}" if len(suffixes) == 1 else f"{path}/{deep}*.jsonl"
        splits = _split_files(found)
        if splits:  # a Hub snapshot (data/train-00000-of-00001.parquet, data/test-...): `*` would train on the test
            train, held = splits
            raise DataError(f"{path} is a folder holding a dataset's splits; point data.train at the training files "
                            f"(`train: {path}/{train}`) and data.eval at the held-out ones (`eval: {path}/{held}`)"
                            f"{hint}")
        raise DataError(f"{path} is a folder; point the recipe at one data file in it, or read them all with a "
                        f"pattern (`train: {pattern}`) or a list (`train: [a.jsonl, b.jsonl]`){hint}")
    if is_pattern(path):
        raise DataError(f"no file matches the pattern {path} (paths in a recipe are relative to the recipe's folder, "
                        "on the command line to the current directory; `**` reaches into subfolders)")
    if not path.is_file():
        from peftkit.config.load import unset_variable_message  # the loader expanded the variables that are set

        unset = unset_variable_message(str(path))
        why = f"; {unset}" if unset else hub_id_hint(path)
        raise DataError(f"data file {path} does not exist (paths in a recipe are relative to the recipe's folder, "
                        f"on the command line to the current directory){why}")
    suffix = data_suffix(path)
    if suffix == ".parquet.gz":
        raise DataError(f"{path}: a gzip'd Parquet file; Parquet compresses its own data, so decompress it "
                        f"(`gunzip {path}`) and point the recipe at the .parquet file")
    if suffix not in (*DATA_SUFFIXES, *JSONL_SUFFIXES):
        raise DataError(f"{path}: peftkit reads {', '.join(DATA_SUFFIXES)} data files (JSON Lines also as .ndjson or "
                        f"without a suffix; all but Parquet also gzip'd, as train.jsonl.gz), not {suffix}; decompress "
                        "or convert it to one of those")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        import pyarrow as pa

        with _reading(path):
            try:
                rows = pq.read_table(path).to_pylist()
            except (pa.ArrowException, OSError) as exc:  # empty, cut off in a download, or not Parquet at all
                if isinstance(exc, PermissionError):  # _reading names it
                    raise
                raise DataError(f"{path}: not a readable Parquet file ({exc}); check that the file was written or "
                                "downloaded whole, or convert the data to JSON Lines") from None
        return _arrow_records([(f"{path}:row {i + 1}", row) for i, row in enumerate(rows)])
    text = _read_text(path)
    if suffix == ".txt":
        first = next((line.strip() for line in _lines(text) if line.strip()), "")
        if first.startswith(("{", "[")) and _first_line_is_json(text):  # records, not a number or a quoted line
            say_once(log, logging.WARNING, f"{path}: a .txt file is trained as plain text, and its lines are JSON "
                     "records, which would be trained as written (braces, keys and all); name it .jsonl (or .json) "
                     "to read them as records")
        text = text.replace("\r\n", "\n").replace("\r", "\n")  # Windows line ends: trained as `\r` tokens else
        chunks = [c.strip() for c in re.split(r"\n[ \t\f\v]*\n", text)]  # a blank line may hold spaces
        return [(f"{path}:chunk {i + 1}", {"text": c}) for i, c in enumerate(chunks) if c]
    if suffix in (".csv", ".tsv"):
        return _csv_records(path, text, "\t" if suffix == ".tsv" else _csv_delimiter(text))
    if suffix == ".json":
        try:
            data = _parse_json(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data" and _first_line_is_json(text):
                return _jsonl_records(path, text)  # JSON Lines named .json, as `datasets`' to_json writes them
            raise DataError(_json_document_problem(path, exc)) from None
        return _json_document_records(path, data)
    return _jsonl_records(path, text)


ARROW_MERGED_FIELDS = ("tools", "functions", "tool_calls", "function_call")
"""Fields whose objects Arrow (Parquet, `datasets`) merges into one struct type across all rows: every tool call's
arguments and every tool schema get the keys of all the others, set to None where a record has none."""


def _without_nulls(value: Any) -> Any:
    """`value` with None-valued object keys dropped, at every depth."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _without_arrow_nulls(record: Any) -> Any:
    """`record` with the keys Arrow added to its tool calls and tool schemas removed (they would be trained as
    `"city": null` arguments). Only for Arrow-backed rows: a null a JSONL record writes is the writer's own."""
    if isinstance(record, dict):
        return {k: _without_nulls(v) if k in ARROW_MERGED_FIELDS else _without_arrow_nulls(v) for k, v in record.items()}
    if isinstance(record, list):
        return [_without_arrow_nulls(item) for item in record]
    return record


def _arrow_records(records: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [(where, _without_arrow_nulls(record)) for where, record in records]


LF_SOURCE_KEYS = ("file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
"""Where an entry of LLaMA-Factory's `dataset_info.json` finds its data."""


LF_COLUMNS = {"prompt": "prompt", "query": "input", "response": "response", "system": "system", "messages": "messages"}
"""LLaMA-Factory `columns` names -> peftkit's `data.columns` names."""


LF_TAGS = {"user_tag": "user", "assistant_tag": "assistant", "system_tag": "system", "observation_tag": "tool",
           "function_tag": "assistant"}


def _is_llamafactory_registry(data: Any) -> bool:
    """LLaMA-Factory's `dataset_info.json`: dataset names -> `{file_name | hf_hub_url | ..., columns, ...}`."""
    return isinstance(data, dict) and bool(data) and all(isinstance(v, dict) for v in data.values()) and any(
        k in entry for entry in data.values() for k in LF_SOURCE_KEYS)


LF_READ_AS_IS = {"prompt": "instruction", "input": "input", "response": "output", "system": "system",
                 "messages": "conversations messages", "role": "from role", "content": "value content"}
"""Field names detection reads without a map (and then with alpaca's `history`, which a map would drop)."""


def _llamafactory_columns(entry: dict[str, Any]) -> dict[str, Any] | None:
    """An entry's `columns` and `tags` as a `data.columns` mapping; None where detection reads its records as they
    are."""
    columns, tags = entry.get("columns") or {}, entry.get("tags") or {}
    mapped = {LF_COLUMNS[k]: v for k, v in columns.items() if k in LF_COLUMNS and isinstance(v, str)}
    roles = {v: LF_TAGS[k] for k, v in tags.items() if k in LF_TAGS and isinstance(v, str)}
    if "messages" in mapped:  # ShareGPT turns: `from` / `value` unless the tags say otherwise
        sharegpt = entry.get("formatting") == "sharegpt"
        mapped["role"] = tags.get("role_tag", "from" if sharegpt else "role")
        mapped["content"] = tags.get("content_tag", "value" if sharegpt else "content")
    if all(v in LF_READ_AS_IS[k].split() for k, v in mapped.items()) and all(
            ROLE_ALIASES.get(k.lower()) == v for k, v in roles.items()):
        return None
    if roles and "messages" in mapped:
        mapped["roles"] = roles
    return mapped


def _llamafactory_registry_error(path: Path, data: dict[str, Any]) -> DataError:
    """Training on the registry would train on its metadata: name the data files it points to instead."""
    found = []
    for name, entry in list(data.items())[:8]:
        source = next((f"{k}: {entry[k]}" for k in LF_SOURCE_KEYS if k in entry), "no file")
        found.append(f"{name} ({source})")
    more = f" and {len(data) - 8} more" if len(data) > 8 else ""
    name, entry = next(((n, e) for n, e in data.items() if "file_name" in e), next(iter(data.items())))
    train = str(path.parent / str(entry.get("file_name", "FILE")))
    columns = _llamafactory_columns(entry)
    example = (f"`data: {flow_yaml({'train': train, 'columns': columns})}`" if columns else
               f"`data: {flow_yaml({'train': train})}` (its fields are ones peftkit reads without a map)")
    return DataError(
        f"{path}: this is LLaMA-Factory's dataset registry (dataset_info.json), not data; point data.train at the "
        f"file named by `file_name` of the dataset you want (relative to {path.parent}; a `hf_hub_url` one as "
        f"`hf:OWNER/NAME`), with its `columns` map as `data.columns` (LLaMA-Factory's `query` is peftkit's `input`). "
        f"Found: {', '.join(found)}{more}; for {name}: {example}")


def _json_document_records(path: Path, data: Any) -> list[tuple[str, Any]]:
    """The records of one JSON document: a list, or an object that wraps one list of records (`{"data": [...]}`,
    `{"version": 2, "train": [...]}`: its other fields are metadata), or a single record."""
    from peftkit.data.formats import detect_format

    if _is_llamafactory_registry(data):
        raise _llamafactory_registry_error(path, data)
    lists = [key for key, value in data.items() if isinstance(value, list) and value and isinstance(value[0], dict)
             ] if isinstance(data, dict) else []
    if _is_conversation(data):  # one conversation: a list of {role, content} messages
        data = [data]
    elif "data" in lists or "examples" in lists:  # a wrapper, also where its metadata looks like a record (`text`)
        data = data["data" if "data" in lists else "examples"]
    elif isinstance(data, dict) and detect_format(data) is not None:
        data = [data]
    elif isinstance(data, dict):
        if len(lists) == 1:
            data = data[lists[0]]
        elif len(lists) > 1:
            raise DataError(f"{path}: a JSON object holding several lists of records ({', '.join(lists)}); write each "
                            "split to its own file and name it in the recipe (data.train, data.eval), or put the list "
                            "to train on under the key `data` (read when present, the others ignored)")
        else:
            data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records")
    return [(f"{path}:item {i + 1}", _as_record(row)) for i, row in enumerate(data)]


def _is_conversation(value: Any) -> bool:
    """A bare list of chat messages: each a `{role, content}` (or tool-call) object and no record of its own (a
    list of alpaca records with a `role` column is a list of records)."""
    from peftkit.data.formats import detect_format

    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and "role" in m and any(k in m for k in ("content", "tool_calls", "function_call"))
        and detect_format(m) is None for m in value)


def _as_record(value: Any) -> Any:
    """A conversation written as a bare list of messages (a .jsonl line, a .json list item) as the chat record it is."""
    return {"messages": value} if _is_conversation(value) else value


def _csv_delimiter(text: str) -> str:
    """`,` unless the header row has none and is split by `;` (spreadsheets in many European locales) or tabs."""
    header = text.split("\n", 1)[0]
    if "," in header:
        return ","
    return max(";\t|", key=header.count) if any(d in header for d in ";\t|") else ","


def _csv_records(path: Path, text: str, delimiter: str) -> list[tuple[str, Any]]:
    """Rows of a CSV file, each named by the line it starts on; quoted fields keep their line breaks. Strict: a stray
    quote otherwise opens a field that swallows the following rows, and `"A" b` loses its quotes. Many TSV writers
    quote nothing (spreadsheet TSV exports, `mysql -B`), so a TSV that is not strict CSV is read with every quote
    as text, where its rows then fit the header."""
    try:
        return _delimited_records(path, text, delimiter, csv.QUOTE_MINIMAL)
    except csv.Error as exc:
        kind, start = "TSV" if delimiter == "\t" else "CSV", exc.args[1]
        if delimiter == "\t":
            with contextlib.suppress(DataError, csv.Error):
                return _delimited_records(path, text, delimiter, csv.QUOTE_NONE)
        raise DataError(f"{path}:{start}: not valid {kind} ({exc.args[0]}): a field that starts with a double quote "
                        "must end with one right before the next delimiter, and a quote inside a quoted field is "
                        'written twice (""); check the quoting of the row starting on this line') from None


def _delimited_records(path: Path, text: str, delimiter: str, quoting: int) -> list[tuple[str, Any]]:
    # Python's csv module refuses fields over 128 KiB, which pandas and `datasets` read (a long document)
    limit = csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    try:
        return _delimited_rows(path, text, delimiter, quoting)
    finally:
        csv.field_size_limit(limit)


def _delimited_rows(path: Path, text: str, delimiter: str, quoting: int) -> list[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True, quoting=quoting,
                            skipinitialspace=_spaced_after_delimiters(text, delimiter))
    records, start = [], 1
    try:
        if reader.fieldnames:  # `question, answer`: the space after the comma is no part of the name
            reader.fieldnames = [name.strip() for name in reader.fieldnames]
            twice = sorted({name for name in reader.fieldnames if name and reader.fieldnames.count(name) > 1})
            if twice:  # each row would keep the last of the columns of one name, the others silently lost
                raise DataError(f"{path}:1: the header names {', '.join(repr(n) for n in twice)} more than once, and a "
                                "row keeps only the last of those columns; give each column its own name")
        start = 2
        for row in reader:
            # DictReader keeps extra fields under the key None and fills missing ones with None: a silently cut reply
            if not any((value or "").strip() for value in row.get(None) or []):
                row.pop(None, None)  # a trailing delimiter (`q,a,`): empty extra fields lose nothing
            if None in row or None in row.values():
                raise _csv_row_length_error(path, start, reader.fieldnames or [], row, delimiter)
            records.append((f"{path}:{start}", row))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise csv.Error(str(exc), start) from None
    return records


def _spaced_after_delimiters(text: str, delimiter: str) -> bool:
    """Whether the header puts a space after each delimiter (`question, answer`): such a file writes its rows so too,
    and the space is no part of a value (kept, every reply would train a leading space; and `q, "a, b"` would not
    read as one quoted field)."""
    header = text.split("\n", 1)[0]
    fields = header.split(delimiter)[1:]
    return delimiter != " " and bool(fields) and all(field.startswith(" ") for field in fields)


def _csv_row_length_error(path: Path, line: int, header: Sequence[str], row: dict[Any, Any],
                          delimiter: str) -> DataError:
    """A row with more or fewer fields than the header: an unquoted delimiter or line break inside a field."""
    found = len(header) + len(row.get(None) or []) - sum(value is None for value in row.values())
    name = {"\t": "tab", ",": "comma", ";": "semicolon"}.get(delimiter, repr(delimiter))
    if found > len(header):
        other = "" if delimiter == "\t" else ", or save the file tab-separated as .tsv"
        why = f"an unquoted {name} inside a field splits it; put that field in double quotes (\"Yes, we ship\"){other}"
    else:
        why = (f"fill in the missing fields (an empty one as nothing between two {name}s); a field holding a line "
               "break must be in double quotes, or the break starts a new row")
    return DataError(f"{path}:{line}: the row has {found} field{'s' * (found != 1)} but the header has {len(header)} "
                    f"({', '.join(header)}): {why}")


def _lines(text: str) -> list[str]:
    """JSON Lines split at line feeds only: `str.splitlines` also splits at U+2028, U+0085 and form feeds, which
    JSON strings may hold unescaped (Python's `json.dumps(..., ensure_ascii=False)` writes them)."""
    return text.split("\n")


def _first_line_is_json(text: str) -> bool:
    try:
        json.loads(next(line for line in _lines(text) if line.strip()))
    except (json.JSONDecodeError, StopIteration):
        return False
    return True


SHOWN_BAD_LINES = 5
"""Malformed lines named in one message: all of them are counted, so one round of fixing finds every one."""


class BadJsonLines(DataError):
    """Lines of a .jsonl file that are not JSON; `records`: the file's other lines, which a reader may check too, so
    that one round of fixes clears every problem of the file."""

    def __init__(self, message: str, records: list[tuple[str, Any]]) -> None:
        super().__init__(message)
        self.records = records


def _jsonl_records(path: Path, text: str) -> list[tuple[str, Any]]:
    records: list[tuple[str, Any]] = []
    bad: list[tuple[int, str, str]] = []  # line number, the parser's complaint, a hint
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            # a byte-order mark opens each part of files joined with `cat` (the first one is dropped on reading)
            records.append((f"{path}:{number}", _as_record(_parse_json(line.removeprefix("\ufeff")))))
        except json.JSONDecodeError as exc:
            if not records and not bad and text.lstrip().startswith("["):
                try:  # a JSON array (pretty-printed) in a .jsonl file: read it as the document it is
                    return _json_document_records(path, _parse_json(text))
                except json.JSONDecodeError as whole:  # its own mistake, where it is (not line 1's lone `[`)
                    if line.strip() == "[":  # else one array per line (messages), line 1's own mistake
                        raise DataError(f"{path}:{whole.lineno}: not valid JSON ({_json_problem(whole)}); the file "
                                        "holds one JSON array, read as a whole") from None
            split = line.strip() in ("{", "[") or (number > 1 and line[:1].isspace())
            hint = (" (a record spread over several lines, as pretty-printing writes it: write each on one line, "
                    "e.g. with `jq -c .`)" if split else "")
            bad.append((number, _json_problem(exc), hint))
            if split:  # every later line of the file fails the same way: the first one says it all
                raise DataError(_bad_lines_message(path, bad, counted_all=False))
    if bad:
        raise BadJsonLines(_bad_lines_message(path, bad), records)
    if len(records) == 1 and isinstance(records[0][1], list):  # a whole JSON array on one line
        return _json_document_records(path, records[0][1])
    return records


def _bad_lines_message(path: Path, bad: list[tuple[int, str, str]], counted_all: bool = True) -> str:
    """The first bad line, then how many there are; counting stops at a record spread over several lines (`hint`
    says so), whose every later line would fail too."""
    number, problem, _ = bad[0]
    hint = bad[-1][2]  # only the last line can carry one: it stopped the count
    message = f"{path}:{number}: line is not valid JSON ({problem})"
    if len(bad) > 1:
        more = "; ".join(f"line {n} ({p.replace(TRAILING_COMMA, ', a comma after the record too')})"
                         for n, p, _ in bad[1:SHOWN_BAD_LINES])  # the explanation said once, for the first line
        rest = len(bad) - SHOWN_BAD_LINES
        counted = f"{len(bad)} lines in all" if counted_all else f"at least {len(bad)} lines"
        message += f"; {counted} are not valid JSON: also {more}" + (f" and {rest} more" if rest > 0 else "")
        if hint:
            hint = f" (line {bad[-1][0]}: {hint.removeprefix(' (')}"
    return f"{message}; each line of a .jsonl file must be one JSON object{hint}"


TRAILING_COMMA = ": a comma after the record; JSON Lines puts nothing between records but the line break"


def _json_document_problem(path: Path, exc: json.JSONDecodeError) -> str:
    """A JSON file's parse error at its line; a comma before a closing `]` / `}` (JSON has no trailing commas, a
    hand-edited list often ends with one) is named at the comma's own line."""
    before = exc.doc[:exc.pos].rstrip()
    if exc.doc[exc.pos:exc.pos + 1] in ("]", "}") and before.endswith(","):
        line = before.count("\n") + 1
        return (f"{path}:{line}: not valid JSON: a comma after the last item before the closing "
                f"`{exc.doc[exc.pos]}` on line {exc.lineno}; JSON allows none there: delete it")
    return f"{path}:{exc.lineno}: not valid JSON ({exc.msg})"


def _json_problem(exc: json.JSONDecodeError) -> str:
    """The parser's complaint with its column: "Extra data" after a complete object is often a trailing comma."""
    problem = f"{exc.msg.removesuffix(' at')} at column {exc.colno}"
    if exc.msg == "Extra data" and exc.doc[exc.pos:].strip().startswith(","):
        problem += TRAILING_COMMA
    return problem


GLOB_CHARACTERS = re.compile(r"[*?[]")


def is_pattern(source: str | Path, root: Path | None = None) -> bool:
    """A path pattern (`data/*.jsonl`); a Hub dataset's slice (`hf:OWNER/NAME:train[:500]`) and a built-in set are
    not, nor a file whose name really holds `[`. `root`: the folder a relative path is read from."""
    from peftkit.data.hub import is_hub_ref
    from peftkit.data.replay import BUILTIN_PREFIX

    text = str(source)
    return (bool(GLOB_CHARACTERS.search(text)) and not is_hub_ref(text) and not text.startswith(BUILTIN_PREFIX)
            and not (Path(root or ".") / text).exists())


def matching_files(source: str | Path, root: Path | None = None) -> list[str | Path]:
    """A path pattern as the files it matches, sorted (`**` reaches into subfolders, as in `datasets`' data_files);
    anything else, and a pattern that matches no file, as it is (reading it then says so). A relative pattern is
    matched inside `root` (given: the files come back joined to it), so `[` or `*` in the root's own name is not read
    as part of the pattern."""
    import glob
    import os

    if not is_pattern(source, root):
        return [source]
    text = os.path.expanduser(str(source))
    if root is not None and not os.path.isabs(text):
        found = sorted(str(Path(root) / p) for p in glob.glob(text, root_dir=root, recursive=True)
                       if (Path(root) / p).is_file())
    else:
        found = sorted(p for p in glob.glob(text, recursive=True) if Path(p).is_file())
    return list(found) or [source]


def data_sources(value: str | Path | Sequence[str | Path]) -> list[str | Path]:
    """A recipe's `data.train` / `data.eval`: one source or a list of them, patterns replaced by their files."""
    listed = [value] if isinstance(value, (str, Path)) else list(value)
    return [found for one in listed for found in matching_files(one)]


def missing_local_files(source: str | Path | Sequence[str | Path] | None) -> list[str]:
    """The files among a recipe's data sources that do not exist (Hub datasets and built-in sets are not files),
    and the patterns that match no file."""
    from peftkit.data.hub import is_hub_ref
    from peftkit.data.replay import BUILTIN_PREFIX

    return [str(one) for one in data_sources(source or []) if str(one) and not is_hub_ref(one)
            and not str(one).startswith(BUILTIN_PREFIX) and not Path(one).exists()]
