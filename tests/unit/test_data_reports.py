"""Data problems a tester reported: each test reproduces one report."""

from __future__ import annotations

import copy
import json
import logging

import pytest

from peftkit.config.schema import DataConfig
from peftkit.data import load_examples
from peftkit.data.build import build_datasets, load_heldout, tokenize_examples
from peftkit.errors import DataError
from tests.conftest import write_jsonl


def _tool_record(name: str, argument: str, value: str) -> dict:
    schema = {"type": "object", "properties": {argument: {"type": "string"}}}
    if name == "check_stock":
        schema["required"] = [argument]
    return {"tools": [{"type": "function", "function": {"name": name, "parameters": schema}}],
            "messages": [{"role": "user", "content": f"{name}?"},
                         {"role": "assistant", "content": "",
                          "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {argument: value}}}]},
                         {"role": "tool", "name": name, "content": "ok"},
                         {"role": "assistant", "content": "done"}]}


TOOL_RECORDS = [_tool_record("check_stock", "item", "X"), _tool_record("weather", "city", "Oslo")]


def _as_read_from_jsonl(tmp_path):
    return load_examples(write_jsonl(tmp_path / "tools.jsonl", TOOL_RECORDS))


def test_parquet_tool_calls_and_schemas_have_no_keys_arrow_merged_in(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "tools.parquet"
    pq.write_table(pa.Table.from_pylist(TOOL_RECORDS), path)
    from_parquet = load_examples(path)
    assert [(e.messages, e.tools) for e in from_parquet] == [(e.messages, e.tools) for e in _as_read_from_jsonl(tmp_path)]
    assert from_parquet[0].messages[1]["tool_calls"][0]["function"]["arguments"] == {"item": "X"}


def test_saved_dataset_tool_calls_have_no_keys_arrow_merged_in(tmp_path):
    import datasets

    datasets.Dataset.from_list(TOOL_RECORDS).save_to_disk(str(tmp_path / "saved"))
    from_disk = load_examples(tmp_path / "saved")
    assert [(e.messages, e.tools) for e in from_disk] == [(e.messages, e.tools) for e in _as_read_from_jsonl(tmp_path)]


def test_a_null_argument_written_in_jsonl_is_kept(tmp_path):
    record = copy.deepcopy(TOOL_RECORDS[1])
    record["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"city": None}
    (example,) = load_examples(write_jsonl(tmp_path / "nulls.jsonl", [record]))
    assert example.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": None}


WORDS = "the library opens at nine and closes at five on weekdays".split()


def _text_rows_config(tmp_path, n_docs: int, max_seq_len: int, **extra) -> DataConfig:
    import random

    rng = random.Random(0)
    docs = [{"text": " ".join(rng.choice(WORDS) for _ in range(150))} for _ in range(n_docs)]
    return DataConfig(train=str(write_jsonl(tmp_path / "docs.jsonl", docs)), max_seq_len=max_seq_len, **extra)


def test_long_plain_text_is_split_into_max_seq_len_rows_not_cut(tmp_path, tiny_tokenizer, caplog):
    from peftkit.data.formats import Example

    text = " ".join(WORDS[j % len(WORDS)] for j in range(300))
    whole = tiny_tokenizer(text)["input_ids"] + [tiny_tokenizer.eos_token_id]
    with caplog.at_level(logging.INFO, logger="peftkit.data.build"):
        rows, stats = tokenize_examples([Example("doc.txt:chunk 1", text=text)], tiny_tokenizer, 64, None)
    assert len(whole) > 3 * 64
    assert [t for row in rows for t in row["input_ids"]] == whole[: len(whole) - (len(whole) % 64 == 1)]
    assert all(len(row["input_ids"]) <= 64 and row["labels"] == row["input_ids"] for row in rows)
    assert stats["truncated"] == 0 and stats["split"] == 1 and stats["split_rows"] == len(rows) > 3
    assert f"split into {len(rows)} rows" in caplog.text and "truncated" not in caplog.text


def test_text_train_and_eval_are_split_by_document_then_chunked(tmp_path, tiny_tokenizer):
    from peftkit.data.build import split_train_eval

    cfg = _text_rows_config(tmp_path, 8, 32, eval_fraction=0.25)
    bundle = build_datasets(cfg, tiny_tokenizer, seed=0)
    train_docs, eval_docs = split_train_eval(load_examples(cfg.train), 0.25, 0)
    assert len(eval_docs) == 2  # whole documents go to eval, and each is chunked there as in training
    assert bundle.eval == tokenize_examples(eval_docs, tiny_tokenizer, 32, None)[0] and len(bundle.eval) > 2
    assert bundle.train == tokenize_examples(train_docs, tiny_tokenizer, 32, None)[0]
    assert bundle.stats["train_split"] == 6 and bundle.stats["train_split_rows"] == len(bundle.train) > 6
    eval_text = {tiny_tokenizer.decode(r["input_ids"]) for r in bundle.eval}
    assert not eval_text & {tiny_tokenizer.decode(r["input_ids"]) for r in bundle.train}


@pytest.mark.parametrize("prompt", ["prompt", "query"])
def test_history_of_prompt_and_query_response_records_is_trained(tmp_path, prompt):
    record = {prompt: "And the second?", "response": "Blue", "history": [["What is the first colour?", "Red"]],
              "system": "Colours bot"}
    (example,) = load_examples(write_jsonl(tmp_path / "glm.jsonl", [record]))
    assert example.messages == ({"role": "system", "content": "Colours bot"},
                                {"role": "user", "content": "What is the first colour?"},
                                {"role": "assistant", "content": "Red"},
                                {"role": "user", "content": "And the second?"},
                                {"role": "assistant", "content": "Blue"})
    with pytest.raises(DataError, match=r"`history` must be a list of \[instruction, response\] string pairs"):
        load_examples(write_jsonl(tmp_path / "bad.jsonl", [{**record, "history": ["just one"]}]))


def test_replay_answered_by_the_base_model_keeps_and_shows_the_tools(tmp_path, monkeypatch):
    import peftkit.evaluate.generation as generation
    from peftkit.data.replay import base_model_answerer

    asked = []

    def fake_generate_replies(model, tokenizer, conversations, *, tools=None, **kwargs):
        asked.extend(zip(map(list, conversations), tools or [None] * len(conversations)))
        return [generation.Reply(f"answer {n}", True) for n in range(len(conversations))]

    monkeypatch.setattr(generation, "generate_replies", fake_generate_replies)
    record = TOOL_RECORDS[0]
    plain = {"messages": record["messages"]}  # the same turns without schemas: another prompt
    examples = load_examples(write_jsonl(tmp_path / "replay.jsonl", [record, plain]))
    answered = base_model_answerer(None, None, cache=tmp_path / "cache.jsonl")(examples)
    assert [tools for _, tools in asked] == [examples[0].tools, None]
    assert answered[0].tools == examples[0].tools and answered[1].tools is None
    assert [e.messages[-1]["content"] for e in answered] == ["answer 0", "answer 1"]


def test_slimorca_weights_on_every_turn_are_read(tmp_path):
    record = {"conversations": [{"from": "system", "value": "Be helpful.", "weight": None},
                                {"from": "human", "value": "Hi?", "weight": 0.0},
                                {"from": "gpt", "value": "Hello!", "weight": 1.0}]}
    (example,) = load_examples(write_jsonl(tmp_path / "slimorca.jsonl", [record]))
    assert [(m["role"], m.get("weight", 1)) for m in example.messages] == [("system", 1), ("user", 1), ("assistant", 1)]
    record["conversations"][1]["weight"] = 1
    with pytest.raises(DataError, match="`weight: 1` .* on a user message is not supported: only assistant turns"):
        load_examples(write_jsonl(tmp_path / "trained_prompt.jsonl", [record]))


def test_openai_legacy_function_calling_is_read_as_tool_use(tmp_path):
    function = {"name": "check_stock", "parameters": {"type": "object", "properties": {"item": {"type": "string"}}}}
    legacy = {"functions": [function],
              "messages": [{"role": "user", "content": "stock X?"},
                           {"role": "assistant", "content": None,
                            "function_call": {"name": "check_stock", "arguments": '{"item": "X"}'}},
                           {"role": "function", "name": "check_stock", "content": "3"},
                           {"role": "assistant", "content": "3 left"}]}
    empty_content = copy.deepcopy(legacy)
    empty_content["messages"][1]["content"] = ""
    modern = {"tools": [{"type": "function", "function": function}],
              "messages": [{"role": "user", "content": "stock X?"},
                           {"role": "assistant", "content": "", "tool_calls": [
                               {"type": "function", "function": {"name": "check_stock", "arguments": {"item": "X"}}}]},
                           {"role": "tool", "name": "check_stock", "content": "3"},
                           {"role": "assistant", "content": "3 left"}]}
    read = load_examples(write_jsonl(tmp_path / "legacy.jsonl", [legacy, empty_content, modern]))
    assert [(e.messages, e.tools) for e in read[:2]] == [(read[2].messages, read[2].tools)] * 2

    both = copy.deepcopy(legacy) | {"tools": modern["tools"]}
    with pytest.raises(DataError, match="both `tools` and the legacy `functions`; keep `tools`"):
        load_examples(write_jsonl(tmp_path / "both.jsonl", [both]))

    heldout = {"functions": [function], "key_fact": "check_stock", "messages": legacy["messages"][:3]}
    (item,) = load_heldout(write_jsonl(tmp_path / "heldout.jsonl", [heldout]), None)
    assert item.tools == read[2].tools and item.messages == read[2].messages[:3]


def test_whole_numbers_stored_as_floats_are_trained_and_matched_as_integers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from peftkit.data.columns import number_as_text

    path = tmp_path / "sums.parquet"
    pq.write_table(pa.table({"question": ["2+2?", "7/2?", "1+1?"], "answer": [4.0, 3.5, 2.0]}), path)
    assert [e.messages[-1]["content"] for e in load_examples(path)] == ["4", "3.5", "2"]
    assert number_as_text(1e20) == "100000000000000000000" and number_as_text(float("nan")) is None  # a missing cell
    pq.write_table(pa.table({"question": ["2+2?"], "key_fact": [4.0]}), tmp_path / "heldout.parquet")
    assert load_heldout(tmp_path / "heldout.parquet", None)[0].key_facts == ("4",)


def test_csv_header_spaces_and_capitals_are_read_and_odd_keys_are_quoted(tmp_path):
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("question, answer\nWhat is 2+2?,4\n", encoding="utf-8")
    capitals = tmp_path / "capitals.csv"
    capitals.write_text("Question,Answer\nWhat is 2+2?,4\n", encoding="utf-8")
    for path in (spaced, capitals):
        assert load_examples(path)[0].messages[-1] == {"role": "assistant", "content": "4"}
    clash = {"Question": "q", "question": "q", " answer": "a"}  # folding would merge two names: not folded
    with pytest.raises(DataError, match=r'unrecognised record \(keys: Question, question, " answer"\)'):
        load_examples(write_jsonl(tmp_path / "odd.jsonl", [clash]))


CONVERSATION = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}]


@pytest.mark.parametrize("name, text", [
    ("list_of_lists.json", json.dumps([CONVERSATION, CONVERSATION])),
    ("one_conversation.json", json.dumps(CONVERSATION)),
    ("lines.jsonl", json.dumps(CONVERSATION) + "\n" + json.dumps(CONVERSATION) + "\n"),
    ("one_line.jsonl", json.dumps(CONVERSATION) + "\n"),
])
def test_a_conversation_written_as_a_bare_list_of_messages_is_a_chat_record(tmp_path, name, text):
    (tmp_path / name).write_text(text, encoding="utf-8")
    examples = load_examples(tmp_path / name)
    assert len(examples) == text.count('"Hello!"') and all(e.messages == tuple(CONVERSATION) for e in examples)
    assert {e.format for e in examples} == {"chat"}


@pytest.mark.parametrize("key", ["data", "examples"])
def test_a_wrapper_whose_metadata_looks_like_a_record_still_yields_its_list(tmp_path, key):
    pairs = [{"question": f"q{n}?", "answer": f"a{n}"} for n in range(3)]
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"text": "My dataset v1", key: pairs}), encoding="utf-8")
    examples = load_examples(path)
    assert [e.messages[-1]["content"] for e in examples] == ["a0", "a1", "a2"]


def test_a_truncation_that_loses_whole_replies_says_so_and_where(tmp_path, tiny_tokenizer, caplog):
    long_question = "what time does the library open " * 20
    lost = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello how are you today"},
            {"role": "user", "content": long_question}, {"role": "assistant", "content": "it opens at nine."}]
    cut = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the library opens at nine " * 20}]
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": lost}, {"messages": cut}])
    with caplog.at_level(logging.WARNING, logger="peftkit.data.build"):
        rows, stats = tokenize_examples(load_examples(path), tiny_tokenizer, 48, None, what="training example")
    assert stats["truncated"] == 2 and stats["replies_lost"] == 1 and len(rows) == 2
    assert f"were truncated, the text past the limit not trained (first: {path}:1)" in caplog.text
    assert f"1 of them lost 1 later assistant reply entirely, past the limit (first: {path}:1)" in caplog.text
    caplog.clear()  # eval rows are scored, not trained: the same warning said of them
    with caplog.at_level(logging.WARNING, logger="peftkit.data.build"):
        tokenize_examples(load_examples(path), tiny_tokenizer, 48, None, what="eval example")
    assert "eval example(s) were longer than data.max_seq_len=48 tokens and were truncated, the text past the limit " \
           "not scored" in caplog.text and "which are not scored at all" in caplog.text and "trained" not in caplog.text
    caplog.clear()  # the forgetting set's questions are scored too
    with caplog.at_level(logging.WARNING, logger="peftkit.data.build"):
        tokenize_examples(load_examples(path), tiny_tokenizer, 48, None, what="general-set")
    assert "the text past the limit not scored" in caplog.text and "trained" not in caplog.text


def test_a_folder_of_data_files_points_at_the_list_form(tmp_path):
    write_jsonl(tmp_path / "data" / "a.jsonl", [{"question": "q?", "answer": "a"}])
    with pytest.raises(DataError, match=r"read them all with a pattern \(`train: .*data/\*\.jsonl`\) or a list "
                                        r"\(`train: \[a.jsonl, b.jsonl\]`\)"):
        load_examples(tmp_path / "data")


def test_numbers_are_text_in_chat_sharegpt_and_completion_and_other_types_are_named(tmp_path):
    records = [{"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": 4.0}]},
               {"conversations": [{"from": "human", "value": 7}, {"from": "gpt", "value": 3.5}]},
               {"prompt": 7, "completion": 4}]
    examples = load_examples(write_jsonl(tmp_path / "numbers.jsonl", records))
    assert [[m["content"] for m in e.messages] for e in examples] == [["7", "4"], ["7", "3.5"], ["7", "4"]]
    bad = {"messages": [{"role": "user", "content": {"a": 1}}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(DataError, match=r"content must be a string or a list .* parts, got an object"):
        load_examples(write_jsonl(tmp_path / "object.jsonl", [bad]))
    with pytest.raises(DataError, match="must both be strings or both be lists .* got a string and an object"):
        load_examples(write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "x", "completion": {"a": 1}}]))


def test_a_held_out_sharegpt_record_is_read(tmp_path):
    record = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "When do you open?"}],
              "key_fact": "nine"}
    (item,) = load_heldout(write_jsonl(tmp_path / "heldout.jsonl", [record]), None)
    assert item.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "When do you open?"})
    assert item.key_facts == ("nine",)


def test_validate_says_how_many_long_texts_were_split(tiny_recipe, tmp_path, capsys):
    import yaml

    from peftkit.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(WORDS[j % len(WORDS)] for j in range(400)) + "\n\nA short paragraph.\n")
    recipe = {**tiny_recipe, "data": {"train": str(corpus), "max_seq_len": 32, "eval_fraction": 0}}
    recipe_file = tmp_path / "text.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(recipe_file)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(text format; 1 long text split into" in out and "rows)" in out


def test_a_json_list_of_records_with_a_role_column_is_a_list_of_records(tmp_path):
    """Only `{role, content}` messages make a bare conversation: alpaca records that carry a `role` field stay
    records."""
    path = tmp_path / "roles.json"
    path.write_text(json.dumps([{"role": "librarian", "instruction": f"When does it open on day {i}?",
                                 "output": f"At {i} am."} for i in range(1, 4)]))
    examples = load_examples(str(path))
    assert [e.format for e in examples] == ["alpaca"] * 3
    assert examples[0].messages[-1] == {"role": "assistant", "content": "At 1 am."}


def test_tokenizing_many_examples_shows_progress_and_few_do_not(tiny_tokenizer, capsys):
    from peftkit.data.build import PROGRESS_FROM
    from peftkit.data.formats import Example

    many = [Example(where=f"d.jsonl:{i}", messages=({"role": "user", "content": f"q {i}"},
                                                      {"role": "assistant", "content": f"a {i}"}))
            for i in range(PROGRESS_FROM)]
    rows, _ = tokenize_examples(many[:10], tiny_tokenizer, 64, None, what="training example")
    assert len(rows) == 10 and "tokenizing" not in capsys.readouterr().err
    rows, _ = tokenize_examples(many, tiny_tokenizer, 64, None, what="training example")
    assert len(rows) == PROGRESS_FROM and "tokenizing training examples" in capsys.readouterr().err
