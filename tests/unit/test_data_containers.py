"""Data files in the containers and layouts users bring from other tools: gzip'd files, unreadable files,
LLaMA-Factory's dataset registry, Hub ids written without `hf:`, axolotl conversations under other keys."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from peftkit.config.schema import ColumnsConfig
from peftkit.data.formats import load_examples
from peftkit.errors import DataError

CHAT = {"messages": [{"role": "user", "content": "Opening hours?"}, {"role": "assistant", "content": "7 to 18."}]}


def gz(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data))
    return path


@pytest.mark.parametrize(("name", "data"), [
    ("t.jsonl.gz", (json.dumps(CHAT) + "\n").encode()),
    ("t.json.gz", json.dumps([CHAT]).encode()),
    ("t.ndjson.gz", (json.dumps(CHAT) + "\n").encode()),
    ("t.csv.gz", b"question,answer\nOpening hours?,7 to 18.\n"),
    ("t.tsv.gz", b"question\tanswer\nOpening hours?\t7 to 18.\n"),
    ("t.txt.gz", "\ufeffThe caf\u00e9 opens at 7.\n\nIt closes at 18.\n".encode()),
])
def test_gzipped_files_are_read_by_their_inner_suffix(tmp_path, name, data):
    examples = load_examples(gz(tmp_path / name, data))
    assert examples[0].where.startswith(f"{tmp_path / name}:")
    if name.endswith(".txt.gz"):
        assert [e.text for e in examples] == ["The caf\u00e9 opens at 7.", "It closes at 18."]  # BOM dropped
    else:
        assert examples[0].messages[-1]["content"] == "7 to 18."


def test_a_gzip_file_named_as_plain_text_is_read_as_the_gzip_it_is(tmp_path):
    """A trial's gzip named `train.jsonl` was told its bytes are not valid UTF-8, and to re-save it as UTF-8."""
    path = tmp_path / "train.jsonl"
    path.write_bytes(gzip.compress(b'{"question": "Opening hours?", "answer": "7 to 18."}\n', mtime=0))
    assert load_examples(path)[0].messages[-1]["content"] == "7 to 18."


def test_gzipped_bad_bytes_and_lines_are_named_by_file_and_line(tmp_path):
    path = gz(tmp_path / "bad.jsonl.gz", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz:2: bytes that are not valid UTF-8 .*decompressed.*UTF-8"):
        load_examples(path)
    path = gz(tmp_path / "broken.jsonl.gz", b'{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl\.gz:2: line is not valid JSON"):
        load_examples(path)


@pytest.mark.parametrize(
    "data",
    # mtime=0: the header carries no timestamp, so every pytest-xdist worker collects the same test id.
    [b"this is not gzip at all", gzip.compress(b'{"text": "cut off"}\n' * 50, mtime=0)[:40]],
    ids=["not-gzip", "truncated-gzip"],
)
def test_a_corrupt_or_truncated_gzip_is_a_data_error_naming_the_file(tmp_path, data):
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(data)
    with pytest.raises(DataError, match=rf"{path}: not a readable gzip file .*uncompressed file"):
        load_examples(path)


@pytest.mark.parametrize(("name", "message"), [("t.parquet.gz", r"Parquet compresses its own data.*gunzip"),
                                               ("t.tar.gz", r"not \.tar\.gz; decompress or convert"),
                                               ("t.gz", r"not \.gz; decompress or convert")])
def test_other_gzipped_files_are_refused(tmp_path, name, message):
    with pytest.raises(DataError, match=message):
        load_examples(gz(tmp_path / name, b"x"))


def test_a_folder_lists_its_gzipped_data_files(tmp_path):
    gz(tmp_path / "train.jsonl.gz", b"{}")
    with pytest.raises(DataError, match=r"is a folder; .* it holds train\.jsonl\.gz"):
        load_examples(tmp_path)


def _unreadable(monkeypatch, *names: str) -> None:
    """As root chmod 000 does not stop reading: refuse the named files as the OS would."""
    read_bytes = Path.read_bytes

    def denied(self: Path) -> bytes:
        if self.name in names:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", denied)


def test_each_unreadable_file_is_its_own_data_error(tmp_path, monkeypatch):
    for name in ("a.jsonl", "b.jsonl.gz", "c.csv"):
        (tmp_path / name).write_text(json.dumps(CHAT) + "\n")
    _unreadable(monkeypatch, "a.jsonl", "b.jsonl.gz")
    with pytest.raises(DataError) as info:
        load_examples([tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", tmp_path / "c.csv"])
    lines = str(info.value).splitlines()
    assert lines[:2] == [f"{tmp_path / n}: cannot read it: permission denied; check its permissions (e.g. `chmod a+r "
                         f"{tmp_path / n}`, or ask its owner to)" for n in ("a.jsonl", "b.jsonl.gz")]
    assert len(lines) == 3 and "c.csv" in lines[2]  # the readable file's own problem is still reported


def test_an_unreadable_parquet_file_is_a_data_error(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    monkeypatch.setattr(pq, "read_table", denied)
    with pytest.raises(DataError, match=r"t\.parquet: cannot read it: permission denied"):
        load_examples(tmp_path / "t.parquet")


def test_validate_lists_every_unreadable_file(tmp_path, monkeypatch):
    from peftkit.config.load import recipe_from_dict
    from peftkit.config.validate import _check_data

    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text(json.dumps(CHAT) + "\n")
    recipe = recipe_from_dict({"model": {"name": "smollm2-135m-instruct"}, "output_dir": str(tmp_path / "run"),
                               "data": {"train": [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]}})
    _unreadable(monkeypatch, "a.jsonl", "b.jsonl")
    [problem], _ = _check_data(recipe)
    assert problem.startswith("data.train: ") and problem.count("cannot read it: permission denied") == 2


LF_REGISTRY = {
    "cafe": {"file_name": "cafe.jsonl", "columns": {"prompt": "instruction", "query": "input", "response": "output",
                                                     "system": "system", "history": "history"}},
    "faq": {"file_name": "faq.json", "columns": {"prompt": "Frage", "response": "Antwort"}},
    "chats": {"file_name": "chats.json", "formatting": "sharegpt",
              "columns": {"messages": "dialog"}, "tags": {"role_tag": "speaker", "content_tag": "text",
                                                          "user_tag": "customer", "assistant_tag": "barista"}},
    "alpaca": {"hf_hub_url": "tatsu-lab/alpaca"},
}


def test_llamafactory_dataset_registry_names_its_data_files(tmp_path):
    path = tmp_path / "dataset_info.json"
    path.write_text(json.dumps(LF_REGISTRY))
    with pytest.raises(DataError) as info:
        load_examples(path)
    message = str(info.value)
    assert message.startswith(f"{path}: this is LLaMA-Factory's dataset registry (dataset_info.json), not data; "
                              "point data.train at the file named by `file_name`")
    assert ("Found: cafe (file_name: cafe.jsonl), faq (file_name: faq.json), chats (file_name: chats.json), "
            "alpaca (hf_hub_url: tatsu-lab/alpaca)") in message
    assert f"for cafe: `data: {{train: {tmp_path / 'cafe.jsonl'}}}` (its fields are ones peftkit reads without a map)" in message


@pytest.mark.parametrize(("name", "columns"), [
    ("faq", "{prompt: Frage, response: Antwort}"),
    ("chats", "{messages: dialog, role: speaker, content: text, roles: {customer: user, barista: assistant}}"),
])
def test_llamafactory_registry_columns_become_a_data_columns_map_that_reads_the_file(tmp_path, name, columns):
    import yaml

    path = tmp_path / "dataset_info.json"
    path.write_text(json.dumps({name: LF_REGISTRY[name]}))
    with pytest.raises(DataError, match=f"for {name}: .*, columns: {columns.replace('{', '[{]')}}}`"):
        load_examples(path)
    record = ({"Frage": "Opening hours?", "Antwort": "7 to 18."} if name == "faq" else
              {"dialog": [{"speaker": "customer", "text": "Hours?"}, {"speaker": "barista", "text": "7 to 18."}]})
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n")
    [example] = load_examples(tmp_path / "data.jsonl", columns=ColumnsConfig(**yaml.safe_load(columns)))
    assert example.messages[-1] == {"role": "assistant", "content": "7 to 18."}


def test_a_json_object_of_objects_without_sources_is_not_taken_for_the_registry(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"cafe": {"columns": {"prompt": "q"}}}))
    with pytest.raises(DataError, match=r"unrecognised record \(keys: cafe\)"):
        load_examples(path)


def test_a_missing_owner_name_path_suggests_the_hub_spelling(tmp_path):
    with pytest.raises(DataError, match=r"does not exist .*; for a Hugging Face Hub dataset write "
                                        r"`hf:HuggingFaceH4/no_robots`$"):
        load_examples(tmp_path / "HuggingFaceH4" / "no_robots")


@pytest.mark.parametrize("written", ["data/train.jsonl", "train.jsonl", "a/b/c", "HuggingFaceH4/no_robots.jsonl",
                                     "HuggingFaceH4/data.csv.gz"])
def test_ordinary_missing_files_get_no_hub_hint(tmp_path, written):
    with pytest.raises(DataError, match="does not exist") as info:
        load_examples(tmp_path / written)
    assert "hf:" not in str(info.value)


def test_a_missing_file_in_an_existing_folder_gets_no_hub_hint(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="does not exist") as info:
        load_examples(tmp_path / "data" / "train")
    assert "hf:" not in str(info.value)


AXO = [{"dialog": [{"speaker": "customer", "text": "Hours?"}, {"speaker": "barista", "text": "7 to 18."}]}]


def test_a_conversation_under_another_key_gets_the_conversation_map(tmp_path):
    path = tmp_path / "axo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in AXO * 2))
    advice = "messages: dialog, role: speaker, content: text, roles: {customer: user, barista: assistant}"
    with pytest.raises(DataError) as info:
        load_examples(path)
    message = str(info.value)
    assert f"`dialog` holds a list of objects, a conversation with other field names: map it in the recipe, e.g. " \
           f"`data: {{columns: {{{advice}}}}}`" in message and "prompt: q" not in message
    examples = load_examples(path, columns=ColumnsConfig(messages="dialog", role="speaker", content="text",
                                                         roles={"customer": "user", "barista": "assistant"}))
    assert [m["role"] for m in examples[0].messages] == ["user", "assistant"]


@pytest.mark.parametrize(("turns", "advice"), [
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "{columns: {messages: chat}}"),
    ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
     "{columns: {messages: chat, role: from, content: value}}"),
    ([{"author": "user", "utterance": "Hi"}, {"author": "agent", "utterance": "Hello"}],
     "{columns: {messages: chat, role: author, content: utterance, roles: {agent: assistant}}}"),
])
def test_the_conversation_map_names_the_keys_found(tmp_path, turns, advice):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"chat": turns, "id": 3}) + "\n")
    with pytest.raises(DataError, match=r"`chat` holds a list of objects") as info:
        load_examples(path)
    assert f"`data: {advice}`" in str(info.value)


def test_records_without_a_list_of_objects_keep_the_one_turn_example(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"q": "Hours?", "a": "7 to 18.", "tags": ["x"]}) + "\n")
    with pytest.raises(DataError, match=r"keys: q, a, tags\).*data: \{columns: \{prompt: q, response: a\}\}"):
        load_examples(path)


def advised_columns(message: str) -> dict:
    """The `data.columns` map a data error suggests, read as YAML: a map that does not parse is no advice."""
    import re

    import yaml

    found = re.search(r"`data: (\{.*?\})`( \(|$|;)", message)
    assert found, message
    return yaml.safe_load(found.group(1))["columns"]


@pytest.mark.parametrize(("user", "agent"), [("[Customer]", "[Agent]"), ("@user", "@bot"), ("Q: customer", "A: agent"),
                                             ("#1", "*2"), ("Kunde", "yes"), ("客户", "客服")])
def test_the_conversation_map_quotes_speaker_names_and_followed_reads_the_file(tmp_path, user, agent):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"dialog": [{"speaker": user, "text": "Hours?"}, {"speaker": agent, "text": "7 to 18."}]},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"`dialog` holds a list of objects") as info:
        load_examples(path)
    columns = advised_columns(str(info.value))
    assert columns["roles"] == {user: "user", agent: "assistant"}
    [example] = load_examples(path, columns=ColumnsConfig(**columns))
    assert [m["role"] for m in example.messages] == ["user", "assistant"]


def test_turns_written_as_user_reply_pairs_get_the_one_turn_example_not_a_conversation_map(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"conv": [{"user": "hi", "bot": "yo"}, {"user": "Hours?", "bot": "7 to 18."}]}) + "\n")
    with pytest.raises(DataError, match=r"keys: conv\).*data: \{columns: \{prompt: q, response: a\}\}") as info:
        load_examples(path)
    assert "holds a list of objects" not in str(info.value) and "role: user" not in str(info.value)


def test_a_turn_key_holding_role_names_is_the_role_key(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"msgs": [{"name": "user", "kind": "x", "content": "Hours?"},
                                         {"name": "assistant", "kind": "x", "content": "7 to 18."}]}) + "\n")
    with pytest.raises(DataError, match=r"`msgs` holds a list of objects") as info:
        load_examples(path)
    columns = advised_columns(str(info.value))
    assert columns == {"messages": "msgs", "role": "name"}
    [example] = load_examples(path, columns=ColumnsConfig(**columns))
    assert [m["role"] for m in example.messages] == ["user", "assistant"]


def test_a_registry_map_with_bracketed_speaker_tags_parses_and_reads_the_file(tmp_path):
    entry = {"file_name": "chats.json", "formatting": "sharegpt", "columns": {"messages": "dialog"},
             "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "[Customer]", "assistant_tag": "@agent"}}
    path = tmp_path / "dataset_info.json"
    path.write_text(json.dumps({"chats": entry}))
    with pytest.raises(DataError, match=r"for chats: `data: \{train: ") as info:
        load_examples(path)
    columns = advised_columns(str(info.value))
    assert columns["roles"] == {"[Customer]": "user", "@agent": "assistant"}
    (tmp_path / "chats.json").write_text(json.dumps([{"dialog": [{"speaker": "[Customer]", "text": "Hours?"},
                                                                 {"speaker": "@agent", "text": "7 to 18."}]}]))
    [example] = load_examples(tmp_path / "chats.json", columns=ColumnsConfig(**columns))
    assert example.messages[-1] == {"role": "assistant", "content": "7 to 18."}


def _chat_file(path: Path, question: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "Yes."}]}
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    return path


def test_a_pattern_in_a_recipe_becomes_the_sorted_files_it_matches(tmp_path):
    from peftkit.config.load import load_recipe

    _chat_file(tmp_path / "data" / "b.jsonl", "Second?")
    _chat_file(tmp_path / "data" / "a.jsonl", "First?")
    _chat_file(tmp_path / "data" / "old" / "c.jsonl", "Third?")
    (tmp_path / "data" / "notes.md").write_text("not data", encoding="utf-8")
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text("data: {train: data/*.jsonl, eval: ['data/**/c.jsonl']}\n", encoding="utf-8")
    recipe = load_recipe(recipe_path)
    assert recipe.data.train == [str(tmp_path / "data" / "a.jsonl"), str(tmp_path / "data" / "b.jsonl")]
    assert recipe.data.eval == [str(tmp_path / "data" / "old" / "c.jsonl")]
    questions = [e.messages[0]["content"] for e in load_examples(recipe.data.train)]
    assert questions == ["First?", "Second?"]


def test_a_pattern_that_matches_no_file_is_named_before_anything_loads(tmp_path):
    from peftkit.config.load import load_recipe
    from peftkit.errors import ConfigError

    _chat_file(tmp_path / "data" / "a.json", "First?")
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text("data: {train: data/*.jsonl, max_seq_len: many}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"`data\.train`: no file matches the pattern .*data/\*\.jsonl"):
        load_recipe(recipe_path)  # listed beside the recipe's other problems
    recipe_path.write_text("data: {train: data/*.jsonl}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no file matches the pattern .*data/\*\.jsonl"):
        load_examples(load_recipe(recipe_path).data.train)


def test_patterns_are_read_by_the_python_api_too_and_an_empty_one_is_a_data_error(tmp_path):
    _chat_file(tmp_path / "x2.jsonl", "Two?")
    _chat_file(tmp_path / "x1.jsonl", "One?")
    assert [e.messages[0]["content"] for e in load_examples(str(tmp_path / "x?.jsonl"))] == ["One?", "Two?"]
    with pytest.raises(DataError, match=r"no file matches the pattern .*y\*\.jsonl"):
        load_examples(str(tmp_path / "y*.jsonl"))


def test_hub_slices_and_real_file_names_with_brackets_are_not_patterns(tmp_path):
    from peftkit.data.files import data_sources, is_pattern

    assert not is_pattern("hf:OWNER/NAME:train[:500]")
    named = _chat_file(tmp_path / "set[1].jsonl", "Bracket?")
    assert data_sources(str(named)) == [str(named)]
    assert [e.messages[0]["content"] for e in load_examples(str(named))] == ["Bracket?"]


def test_a_folder_of_data_files_suggests_the_pattern_that_reads_them(tmp_path):
    _chat_file(tmp_path / "a.jsonl", "First?")
    _chat_file(tmp_path / "b.jsonl", "Second?")
    with pytest.raises(DataError, match=rf"read them all with a pattern \(`train: {tmp_path}/\*\.jsonl`\)"):
        load_examples(tmp_path)


def test_a_pattern_is_matched_inside_a_recipe_folder_whose_name_holds_glob_characters(tmp_path):
    from peftkit.config.load import load_recipe

    folder = tmp_path / "run[1]"
    _chat_file(folder / "data" / "a.jsonl", "First?")
    _chat_file(folder / "data" / "sub" / "b.jsonl", "Deeper?")
    (folder / "r.yaml").write_text("data: {train: data/*.jsonl}\n", encoding="utf-8")
    assert load_recipe(folder / "r.yaml").data.train == str(folder / "data" / "a.jsonl")
    with pytest.raises(DataError, match=r"read them all with a pattern \(`train: .*data/\*\*/\*\.jsonl`\)"):
        load_examples(folder / "data")  # one file only in a subfolder: the suggestion reaches into it


@pytest.mark.parametrize(("field", "turns", "speaker"), [
    ("conversations", [{"from": "human", "value": "hi"}, {"from": "bing", "value": "Hello"}], "from"),
    ("messages", [{"role": "user", "content": "hi"}, {"role": "agent", "content": "Hello"}], "role"),
    ("messages", [{"role": "kunde", "content": "hi"}, {"role": "assistant", "content": "Hello"}], "role"),
])
def test_an_unknown_speaker_is_mapped_to_the_role_its_turn_calls_for(tmp_path, field, turns, speaker):
    """A reply's unknown speaker was mapped to `user`, and the map, pasted as given, was then refused ("roles out of
    order"): after a user turn it is the assistant."""
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({field: turns}) + "\n")
    with pytest.raises(DataError, match="unknown role|peftkit reads") as info:
        load_examples(path)
    import re

    import yaml

    columns = yaml.safe_load(re.search(r"`data\.columns: (\{.*?\})`", str(info.value)).group(1))
    [example] = load_examples(path, columns=ColumnsConfig(**columns))
    assert [m["role"] for m in example.messages] == ["user", "assistant"]
