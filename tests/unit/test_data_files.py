"""Data files as users bring them: line separators inside strings, multi-line CSV fields, other delimiters,
JSON arrays in .jsonl files, wrapped JSON, LLaMA-Factory's alpaca history, ShareGPT speaker names under `messages`."""

from __future__ import annotations

import csv
import json
import logging
import re

import pytest

from peftkit.config.schema import DataConfig
from peftkit.data.build import build_datasets, load_heldout
from peftkit.data.formats import load_examples
from peftkit.errors import DataError
from tests.conftest import CHAT_RECORDS, write_jsonl

PAIR = {"question": "Opening hours?", "answer": "Mon-Fri 7-18"}


def test_jsonl_lines_split_at_line_feeds_only(tmp_path):
    """`json.dumps(ensure_ascii=False)` writes U+2028, U+0085 and form feeds raw; `str.splitlines` would cut there."""
    reply = "Mon-Fri 7-18\u2028Sat 7:30-14\x85Sun closed\x0c."
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hours?"},
                                             {"role": "assistant", "content": reply}]}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    [example] = load_examples(path)
    assert example.messages[1]["content"] == reply


def test_csv_quoted_fields_keep_their_line_breaks_and_rows_their_line_numbers(tmp_path):
    path = tmp_path / "t.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "answer"])
        writer.writerow(["Weekend hours?", "Saturday: 7:30-14:00\nSunday: closed"])
        writer.writerow(["Weekday hours?", ""])
    with pytest.raises(DataError, match=r"t\.csv:4: the response field 'answer' is empty"):
        load_examples(path)
    path.write_text(path.read_text().replace('Weekday hours?,', 'Weekday hours?,7-18'))
    first, second = load_examples(path)
    assert first.messages[1]["content"] == "Saturday: 7:30-14:00\nSunday: closed"
    assert first.where.endswith("t.csv:2") and second.where.endswith("t.csv:4")


@pytest.mark.parametrize(("name", "delimiter"), [("t.csv", ";"), ("t.csv", "\t"), ("t.tsv", "\t")])
def test_csv_with_semicolons_or_tabs_is_read(tmp_path, name, delimiter):
    path = tmp_path / name
    path.write_text(f"question{delimiter}answer\nOpening hours?{delimiter}Mon-Fri, 7-18\n", encoding="utf-8")
    [example] = load_examples(path)
    assert example.messages[1]["content"] == "Mon-Fri, 7-18"


def test_a_csv_written_with_a_space_after_each_comma_trains_no_leading_space(tmp_path):
    """`question, answer` files write their rows so too: the space trained at the start of every reply (ChatML keeps
    it), and a quoted field after it did not read as one."""
    path = tmp_path / "t.csv"
    path.write_text('question, answer\nOpening hours?, Mon-Fri 7-18\nParking?, "Yes, behind the shop"\n')
    first, second = load_examples(path)
    assert first.messages[0]["content"] == "Opening hours?" and first.messages[1]["content"] == "Mon-Fri 7-18"
    assert second.messages[1]["content"] == "Yes, behind the shop"
    path.write_text('question,answer\nOpening hours?, indented on purpose\n')  # no space in the header: kept
    [example] = load_examples(path)
    assert example.messages[1]["content"] == " indented on purpose"


def test_csv_messages_column_holding_json_text(tmp_path):
    path = tmp_path / "t.csv"
    messages = [{"role": "user", "content": "Hours?"}, {"role": "assistant", "content": "7-18"}]
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["messages"], [json.dumps(messages)]])
    [example] = load_examples(path)
    assert list(example.messages) == messages


@pytest.mark.parametrize("text", [json.dumps([PAIR, PAIR], indent=2), json.dumps([PAIR, PAIR])])
def test_a_json_array_in_a_jsonl_file_is_read_as_one(tmp_path, text):
    path = tmp_path / "t.jsonl"
    path.write_text(text + "\n")
    assert len(load_examples(path)) == 2


def test_a_list_on_one_line_of_many_says_what_a_jsonl_line_holds(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(PAIR) + "\n" + json.dumps([PAIR]) + "\n")
    with pytest.raises(DataError, match=r"t\.jsonl:2: expected a JSON object \(one record\), got a list; a \.jsonl"):
        load_examples(path)


def test_a_json_object_wrapping_one_list_of_records(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"train": [PAIR, PAIR, PAIR]}))
    assert len(load_examples(path)) == 3
    path.write_text(json.dumps({"train": [PAIR], "test": [PAIR]}))
    with pytest.raises(DataError, match="several lists of records \\(train, test\\); write each split to its own file"):
        load_examples(path)
    chat = {"messages": [{"role": "user", "content": "Hours?"}, {"role": "assistant", "content": "7-18"}]}
    path.write_text(json.dumps(chat))  # one record whose field is a list: not a wrapper
    [example] = load_examples(path)
    assert example.format == "chat"


def test_alpaca_history_becomes_the_earlier_turns(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"instruction": "And on Sunday?", "input": "", "output": "Closed on Sundays.",
                                "system": "Bakery assistant.", "history": [["When do you open on Saturday?", "At 7:30."]]}))
    [example] = load_examples(path)
    assert [(m["role"], m["content"]) for m in example.messages] == [
        ("system", "Bakery assistant."), ("user", "When do you open on Saturday?"), ("assistant", "At 7:30."),
        ("user", "And on Sunday?"), ("assistant", "Closed on Sundays.")]
    path.write_text(json.dumps({"instruction": "a", "output": "b", "history": ["just one string"]}))
    with pytest.raises(DataError, match=r"`history` must be a list of \[instruction, response\] string pairs"):
        load_examples(path)


def test_numbers_are_answers_in_alpaca_and_held_out_files(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"instruction": "2 + 2?", "input": 3, "output": 4}))
    [example] = load_examples(path)
    assert example.messages[0]["content"] == "2 + 2?\n\n3" and example.messages[1]["content"] == "4"
    heldout = tmp_path / "h.jsonl"
    heldout.write_text(json.dumps({"question": "2 + 2?", "key_fact": 4}) + "\n"
                       + json.dumps({"question": "pi?", "key_fact": [3.14, "three"]}) + "\n")
    assert [item.key_facts for item in load_heldout(heldout, None)] == [("4",), ("3.14", "three")]


@pytest.mark.parametrize(("user", "assistant"), [("human", "gpt"), ("User", "Assistant"), ("human", "bot")])
def test_sharegpt_speaker_names_under_messages(tmp_path, user, assistant):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"messages": [{"role": user, "content": "Hours?"}, {"role": assistant, "content": "7-18"}]}))
    [example] = load_examples(path)
    assert [m["role"] for m in example.messages] == ["user", "assistant"]


def test_axolotl_training_flag_marks_context_turns(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"messages": [
        {"role": "user", "content": "Hi", "training": False}, {"role": "assistant", "content": "Hello!", "training": False},
        {"role": "user", "content": "Hours?", "training": False}, {"role": "assistant", "content": "7-18", "training": True}]}))
    [example] = load_examples(path)
    assert [m.get("weight", 1) for m in example.messages if m["role"] == "assistant"] == [0, 1]
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi", "training": True},
                                             {"role": "assistant", "content": "Hello!"}]}))
    with pytest.raises(DataError, match="on assistant messages only; `data.train_on_prompt: true` trains the prompts"):
        load_examples(path)


def test_sharegpt_system_turn_wins_over_the_record_system(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"system": "record", "conversations": [
        {"from": "system", "value": "turn"}, {"from": "human", "value": "Hours?"}, {"from": "gpt", "value": "7-18"}]}))
    [example] = load_examples(path)
    assert [(m["role"], m["content"]) for m in example.messages][0] == ("system", "turn") and len(example.messages) == 3


def test_a_conversation_opening_with_a_greeting_gets_a_fix(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"conversations": [{"from": "gpt", "value": "Welcome!"}, {"from": "human", "value": "Hours?"},
                                                  {"from": "gpt", "value": "7-18"}]}))
    with pytest.raises(DataError, match="opens with the assistant's greeting: drop the greeting, or put it in the system"):
        load_examples(path)


def test_an_eval_file_with_no_trained_token_left_is_an_error(tmp_path, tiny_tokenizer, chat_file, caplog):
    long_eval = tmp_path / "eval.jsonl"
    long_eval.write_text(json.dumps({"messages": [{"role": "user", "content": "word " * 200},
                                                  {"role": "assistant", "content": "ok"}]}) + "\n")
    cfg = DataConfig(train=str(chat_file), eval=str(long_eval), max_seq_len=64)
    with caplog.at_level(logging.WARNING), pytest.raises(DataError, match=r"eval\.jsonl: none of the 1 eval examples"):
        build_datasets(cfg, tiny_tokenizer)
    assert "eval example(s) were longer" not in caplog.text  # the error alone says it (not a warning first)


def test_a_csv_row_with_more_or_fewer_fields_than_the_header_is_named(tmp_path):
    """csv.DictReader puts extra fields under the key None: an unquoted comma silently cut the reply."""
    path = tmp_path / "t.csv"
    path.write_text("question,answer\nOpening hours?,7-18\nDo you ship abroad?,Yes, we ship to 12 countries.\n")
    with pytest.raises(DataError, match=r"t\.csv:3: the row has 3 fields but the header has 2 \(question, answer\): "
                                        r"an unquoted comma inside a field splits it; put that field in double quotes"):
        load_examples(path)
    path.write_text('question,answer\n"Do you ship abroad?","Yes, we ship to 12 countries."\n')
    assert load_examples(path)[0].messages[1]["content"] == "Yes, we ship to 12 countries."
    path.write_text("question,answer,\nOpening hours?,7-18,\n")  # trailing commas: empty extra fields lose nothing
    assert load_examples(path)[0].messages[1]["content"] == "7-18"
    path.write_text("question,answer\nOpening hours?,7-18,\n")
    assert load_examples(path)[0].messages[1]["content"] == "7-18"
    path.write_text("question,answer\nOpening hours?,7-18\nDo you ship abroad?\n")
    with pytest.raises(DataError, match=r"t\.csv:3: the row has 1 field but the header has 2 \(question, answer\): "
                                        "fill in the missing fields"):
        load_examples(path)


def test_a_json_object_wrapping_one_list_next_to_metadata(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"version": "1", "source": "faq", "rows": [PAIR, PAIR]}))
    assert [e.format for e in load_examples(path)] == ["question/answer"] * 2
    path.write_text(json.dumps({"version": "1", "rows": [PAIR], "more": [PAIR]}))
    with pytest.raises(DataError, match=r"several lists of records \(rows, more\); .* under the key `data`"):
        load_examples(path)


def test_a_byte_order_mark_opening_a_later_part_of_joined_jsonl_files(tmp_path):
    path = tmp_path / "t.jsonl"
    line = json.dumps(PAIR) + "\n"
    path.write_bytes(("\ufeff" + line + "\ufeff" + line).encode("utf-8"))  # `cat a.jsonl b.jsonl`, both with a BOM
    assert len(load_examples(path)) == 2


def test_a_saved_dataset_dict_with_several_splits_says_which_one_it_reads(tmp_path, caplog):
    import datasets

    chat = {"messages": [{"role": "user", "content": "Hours?"}, {"role": "assistant", "content": "7-18"}]}
    datasets.DatasetDict({"train": datasets.Dataset.from_list([chat] * 3),
                          "test": datasets.Dataset.from_list([chat])}).save_to_disk(str(tmp_path / "dd"))
    with caplog.at_level(logging.INFO, logger="peftkit.data.hub"):
        assert len(load_examples(tmp_path / "dd")) == 3
        assert len(load_examples(tmp_path / "dd")) == 3  # validation, the split, --show-data: said once
    assert f"holds the splits train, test: reading `train` (for another split point at its folder, e.g. " \
           f"{tmp_path / 'dd' / 'test'})" in caplog.text
    assert caplog.text.count("holds the splits") == 1
    assert len(load_examples(tmp_path / "dd" / "test")) == 1


# ------------------------------------------------------------------------------------------------
# Data as users export it (a tester's session: pandas, spreadsheets, pretty-printers)


def test_a_stray_quote_in_a_csv_row_is_refused_not_merged_with_the_rows_after_it(tmp_path):
    """Without strict parsing, a field opened by a quote swallowed every later row into one reply, silently."""
    stray = tmp_path / "q.csv"
    stray.write_text('question,answer\nScreen size?,"15 inches\nQ3?,A3\nQ4?,A4\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"q.csv:2: not valid CSV .*double quote"):
        load_examples(stray)
    quoted = tmp_path / "h.csv"  # `"Hamlet" is by whom?` lost its quotes
    quoted.write_text('question,answer\n"Hamlet" is by whom?,Shakespeare\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"h.csv:2: not valid CSV"):
        load_examples(quoted)
    unquoted = tmp_path / "s.tsv"  # TSV writers that quote nothing: a cell starting with a quote is text
    unquoted.write_text('question\tanswer\nWhat did she say?\t"Hi" she said\nScreen?\t"15 inches\nQ3?\tA3\n')
    assert [e.messages[1]["content"] for e in load_examples(unquoted)] == ['"Hi" she said', '"15 inches', "A3"]
    quoted = tmp_path / "q.tsv"  # a quoted TSV cell keeps its line break
    quoted.write_text('question\tanswer\nQ\t"multi\nline"\nQ2\tA2\n')
    assert [e.messages[1]["content"] for e in load_examples(quoted)] == ["multi\nline", "A2"]
    broken = tmp_path / "b.tsv"  # read either way, its rows do not fit: the strict reading's error, named TSV
    broken.write_text('question\tanswer\nQ\t"a\tb" c\n')
    with pytest.raises(DataError, match=r"b.tsv:2: not valid TSV"):
        load_examples(broken)
    fine = tmp_path / "ok.csv"  # a quote inside an unquoted field, and a doubled one inside a quoted field, are text
    fine.write_text('question,answer\nA 5" screen?,yes\nQ,"a ""quoted"" word"\n', encoding="utf-8")
    assert [e.messages[0]["content"] for e in load_examples(fine)] == ['A 5" screen?', "Q"]
    assert load_examples(fine)[1].messages[1]["content"] == 'a "quoted" word'


def test_nan_and_infinity_are_missing_values_not_the_text_nan(tmp_path):
    """json.dumps writes a pandas missing cell as NaN: it was trained as the answer "nan" (and a key fact "nan")."""
    from peftkit.data.columns import number_as_text

    answer = tmp_path / "a.jsonl"
    answer.write_text('{"question": "Q", "answer": NaN}\n', encoding="utf-8")
    with pytest.raises(DataError, match="'answer' is null"):
        load_examples(answer)
    alpaca = tmp_path / "b.jsonl"
    alpaca.write_text('{"instruction": "I2", "input": NaN, "output": "O2"}\n', encoding="utf-8")
    assert load_examples(alpaca)[0].messages[0]["content"] == "I2"
    facts = tmp_path / "h.jsonl"
    facts.write_text('{"question": "How many?", "key_fact": Infinity}\n', encoding="utf-8")
    with pytest.raises(DataError, match="key_fact"):
        load_heldout(facts, None)
    assert number_as_text(float("nan")) is None and number_as_text(4.0) == "4"  # Parquet's float cells


def test_a_null_field_counts_as_absent_when_detecting_the_format(tmp_path):
    """pandas / Arrow / `datasets` write every column on every row: prompt/completion rows next to chat rows hold
    `messages: null`, and were refused as broken chat records."""
    mixed = write_jsonl(tmp_path / "m.jsonl", [
        {"messages": None, "prompt": "P1", "completion": "C1"},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
         "prompt": None, "completion": None}])
    assert [e.format for e in load_examples(mixed)] == ["prompt_completion", "chat"]
    broken = write_jsonl(tmp_path / "b.jsonl", [{"question": "Q", "answer": None}])
    with pytest.raises(DataError, match="'answer' is null"):  # a record that is nothing without it: still named
        load_examples(broken)


def test_text_paragraphs_split_at_blank_lines_holding_spaces(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("First paragraph.\n  \nSecond paragraph.\n\t\nThird.\n", encoding="utf-8")
    assert [e.text for e in load_examples(text)] == ["First paragraph.", "Second paragraph.", "Third."]
    text.write_bytes(b"First line\r\nsame paragraph.\r\n\r\nSecond.\r\n")  # Windows line ends: no `\r` trained
    assert [e.text for e in load_examples(text)] == ["First line\nsame paragraph.", "Second."]


def test_a_json_files_trailing_comma_is_named_at_its_own_line(tmp_path):
    """A hand-edited JSON list ending `},` then `]` got "...:4: not valid JSON (Expecting value)": the line of the
    bracket, and no word of the comma."""
    listed = tmp_path / "alpaca.json"
    listed.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": "d"},\n]\n')
    with pytest.raises(DataError, match=r"alpaca.json:3: not valid JSON: a comma after the last item before the "
                                        r"closing `\]` on line 4; JSON allows none there: delete it"):
        load_examples(listed)
    other = tmp_path / "other.json"
    other.write_text('[{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}]\n')
    with pytest.raises(DataError, match=r"other.json:2: not valid JSON \(Expecting ',' delimiter\)$"):
        load_examples(other)


def test_jsonl_mistakes_are_placed_and_explained(tmp_path):
    array = tmp_path / "a.jsonl"  # a pretty-printed array with a trailing comma: the comma's line, not line 1's `[`
    array.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c", "completion": "d"},\n]\n')
    with pytest.raises(DataError, match=r"a.jsonl:4: not valid JSON .*one JSON array"):
        load_examples(array)
    per_line = tmp_path / "m.jsonl"  # one message array per line, line 1 broken: line 1's own mistake
    per_line.write_text('[{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}\n'
                        '[{"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]\n')
    with pytest.raises(DataError, match=r"m.jsonl:1: line is not valid JSON"):
        load_examples(per_line)
    commas = tmp_path / "c.jsonl"
    commas.write_text('{"prompt": "a", "completion": "b"},\n{"prompt": "c", "completion": "d"},\n')
    with pytest.raises(DataError, match=r"c.jsonl:1: .*a comma after the record") as caught:
        load_examples(commas)
    assert str(caught.value).count("JSON Lines puts nothing between records") == 1, "explained once"
    assert "line 2 (Extra data at column 35, a comma after the record too)" in str(caught.value)
    pretty = tmp_path / "p.jsonl"
    pretty.write_text('{\n  "prompt": "a",\n  "completion": "b"\n}\n')
    with pytest.raises(DataError, match=r"p.jsonl:1: .*write each on one line, e.g. with `jq -c .`"):
        load_examples(pretty)
    cut = tmp_path / "t.jsonl"
    cut.write_text('{"prompt": "a", "completion": "b\n')
    with pytest.raises(DataError) as info:
        load_examples(cut)
    assert "(Unterminated string starting at column 31)" in str(info.value)  # was "starting at at column"


def test_a_held_out_conversation_that_holds_its_answer_is_refused(tmp_path):
    """A chat record reused as a question ended with the reply: the model was shown the answer it was scored on."""
    path = write_jsonl(tmp_path / "h.jsonl", [{"messages": [{"role": "user", "content": "Q"},
                                                            {"role": "assistant", "content": "A"}], "key_fact": "A"}])
    with pytest.raises(DataError, match=r"h.jsonl:1: this held-out conversation ends with an assistant turn"):
        load_heldout(path, None)
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"messages": [{"role": "user", "content": "Q"},
                                                           {"role": "assistant", "content": "A"},
                                                           {"role": "user", "content": "and?"}], "key_fact": "B"}])
    assert load_heldout(ok, None)[0].question == "and?"


def test_held_out_field_names_fold_as_training_data_do(tmp_path):
    path = write_jsonl(tmp_path / "h.jsonl", [{"Question": "Opening hours?", "Key_Fact ": "7-18"}])
    [item] = load_heldout(path, None)
    assert item.question == "Opening hours?" and item.key_facts == ("7-18",)
    wrong = write_jsonl(tmp_path / "w.jsonl", [{"question": "Opening hours?", "answer": "7-18"}])
    with pytest.raises(DataError, match=r"w.jsonl:1: held-out records need `question` .* and `key_fact` "
                                        r"\(this one: question, answer\); if `answer` is the fact a reply must "
                                        r"contain, name it `key_fact`"):
        load_heldout(wrong, None)
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "Opening hours?"},
                                                            {"role": "assistant", "content": "7-18"}]}])
    with pytest.raises(DataError, match=r"it is a training record \(chat format\): training data goes in data.train "
                                        r"\(`peftkit eval --data FILE`"):
        load_heldout(chat, None)  # `eval --heldout TRAIN_FILE`
    blank = write_jsonl(tmp_path / "b.jsonl", [{"question": "   ", "key_fact": "Bob"}])
    with pytest.raises(DataError, match=r"b.jsonl:1: the held-out question is empty"):
        load_heldout(blank, None)


def test_every_file_of_a_list_is_checked(tmp_path):
    """`data.train: [a, b]` stopped at a's mistake: fixing it only revealed b's."""
    turns = [{"role": "user", "content": "q"}, {"role": "user", "content": "again"}, {"role": "assistant", "content": "a"}]
    first = write_jsonl(tmp_path / "a.jsonl", [{"messages": turns}])
    second = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p"}])
    with pytest.raises(DataError) as info:
        load_examples([first, second])
    assert "a.jsonl:1" in str(info.value) and "b.jsonl:1" in str(info.value)


def test_openai_developer_messages_are_system_messages(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "developer", "content": "Be brief."},
                                                            {"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "hello"}]}])
    assert [m["role"] for m in load_examples(path)[0].messages] == ["system", "user", "assistant"]


def test_a_held_out_file_given_as_training_data_is_named_as_such(tmp_path):
    """The generic advice (map the fields with data.columns) would have trained on the key facts."""
    path = write_jsonl(tmp_path / "h.jsonl", [{"question": "Opening hours?", "key_fact": "7-18"}] * 2)
    with pytest.raises(DataError, match=r"a held-out question \(keys: question, key_fact\).*under data.heldout") as info:
        load_examples(path)
    assert "columns" not in str(info.value)


def test_format_text_on_records_without_text_names_what_is_missing(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", CHAT_RECORDS[:1])
    with pytest.raises(DataError, match=r"c.jsonl:1: read as plain text \(data.format: text\), but the record has no "
                                        r"`text` field \(its fields: messages\)"):
        load_examples(path, "text")


def test_a_format_set_in_the_recipe_that_the_records_are_not_in_names_theirs(tmp_path):
    """`data.format: alpaca` on chat records said only that `instruction` is missing."""
    chat = write_jsonl(tmp_path / "c.jsonl", CHAT_RECORDS[:1])
    with pytest.raises(DataError, match=r"'instruction' is missing .*; the record is in chat format, which "
                                        r"data.format: alpaca does not read: set data.format to auto"):
        load_examples(chat, "alpaca")
    pair = write_jsonl(tmp_path / "p.jsonl", [{"question": "hi?", "answer": "hello"}])
    with pytest.raises(DataError, match=r"the record is a question/answer pair, which data.format: sharegpt"):
        load_examples(pair, "sharegpt")
    with pytest.raises(DataError) as info:
        load_examples(chat, "text")
    assert "the record is in chat format" not in str(info.value)  # the text format's own message advises it already
    null = write_jsonl(tmp_path / "n.jsonl", [{"instruction": None, "input": "2 + 2?", "output": "4"}])
    with pytest.raises(DataError) as info:  # an alpaca record with a null instruction: its own mistake to fix
        load_examples(null, "alpaca")
    assert "instruction" in str(info.value) and "pair" not in str(info.value)


def test_every_malformed_jsonl_line_is_counted_in_one_message(tmp_path):
    good = '{"prompt": "a", "completion": "b"}'
    lines = [good] * 30
    for number in (4, 9, 12, 15, 20, 27, 30):
        lines[number - 1] = '{"prompt": "a", "completion": '
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load_examples(path)
    message = str(info.value)
    assert message.startswith(f"{path}:4: line is not valid JSON (Expecting value at column 31); 7 lines in all")
    assert "also line 9 (" in message and "line 20 (" in message and "line 27" not in message
    assert "and 2 more; each line of a .jsonl file must be one JSON object" in message


def test_counting_malformed_lines_stops_at_a_record_spread_over_lines_and_says_so(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "a", "completion": \n{"prompt": "b", "completion": "c"}\n  "prompt": "x",\n{oops\n')
    with pytest.raises(DataError) as info:
        load_examples(path)
    message = str(info.value)
    assert message.startswith(f"{path}:1: line is not valid JSON (")
    assert "at least 2 lines are not valid JSON: also line 3 (" in message and "line 4" not in message
    assert message.endswith("must be one JSON object (line 3: a record spread over several lines, as pretty-printing "
                            "writes it: write each on one line, e.g. with `jq -c .`)")


@pytest.mark.parametrize("name", ["long.csv", "long.tsv"])
def test_a_field_over_128_kib_is_read(tmp_path, name):
    """Python's csv module refuses fields over 128 KiB (a long document), which pandas and `datasets` read: the CSV
    was refused as badly quoted, the TSV crashed with a csv.Error traceback."""
    path = tmp_path / name
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out, delimiter="\t" if name.endswith(".tsv") else ",")
        writer.writerow(["question", "answer"])
        writer.writerow(["long?", "x " * 100_000])
    (example,) = load_examples(path)
    assert example.messages[-1]["content"].strip() == ("x " * 100_000).strip()


def test_damaged_parquet_and_save_to_disk_folders_get_one_message(tmp_path):
    """A cut-off download or a hand-edited folder: pyarrow's and datasets' tracebacks (ArrowInvalid, KeyError)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    whole = tmp_path / "whole.parquet"
    pq.write_table(pa.table({"text": ["one", "two"]}), whole)
    (tmp_path / "cut.parquet").write_bytes(whole.read_bytes()[:100])
    (tmp_path / "empty.parquet").write_bytes(b"")
    for name in ("cut.parquet", "empty.parquet"):
        with pytest.raises(DataError, match=rf"{name}: not a readable Parquet file \(.*\); check that the file was"):
            load_examples(tmp_path / name)
    saved = tmp_path / "saved"
    saved.mkdir()
    for name in ("state.json", "dataset_info.json"):
        (saved / name).write_text("{}")
    with pytest.raises(DataError, match=r"saved: not a readable `datasets` save_to_disk folder \(KeyError"):
        load_examples(saved)


def test_a_header_naming_a_column_twice_is_refused(tmp_path):
    """`question,question,answer`: each row kept the last question and lost the first without a word."""
    path = tmp_path / "twice.csv"
    path.write_text("question,question,answer\na,b,c\n")
    with pytest.raises(DataError, match=r"twice.csv:1: the header names 'question' more than once"):
        load_examples(path)
    trailing = tmp_path / "trailing.csv"  # a spreadsheet's empty trailing columns are no names given twice
    trailing.write_text("question,answer,,\nWhat is 2+2?,4,,\n")
    assert len(load_examples(trailing)) == 1


def test_a_folder_of_split_files_points_train_and_eval_at_their_own_files(tmp_path):
    """A Hub snapshot folder: the advised `**/*.parquet` pattern trained on its test split too, without a word."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "snapshot" / "data"
    folder.mkdir(parents=True)
    for name in ("train-00000-of-00002.parquet", "train-00001-of-00002.parquet", "test-00000-of-00001.parquet"):
        pq.write_table(pa.table({"text": ["one"]}), folder / name)
    with pytest.raises(DataError, match="holding a dataset's splits") as caught:
        load_examples(tmp_path / "snapshot")
    advised = dict(re.findall(r"`(train|eval): (\S+)`", str(caught.value)))
    assert len(load_examples(advised["train"])) == 2 and len(load_examples(advised["eval"])) == 1
    for name in ("validation.jsonl", "test.jsonl", "train.jsonl"):  # validation measures training, test is kept
        (tmp_path / "splits" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "splits" / name).write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match=r"`eval: \S+/validation.jsonl`"):
        load_examples(tmp_path / "splits")
    plain = tmp_path / "plain"  # files not named by split: the general advice
    plain.mkdir()
    for name in ("shop.jsonl", "trainer-notes.jsonl"):
        (plain / name).write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match="is a folder; point the recipe at one data file"):
        load_examples(plain)


def test_a_record_of_another_type_is_named_in_words(tmp_path):
    """`got a int`, `got a NoneType`: Python's type names, with the wrong article."""
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "fine"}\n7\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2: expected a JSON object \(one record\), got a number$"):
        load_examples(path)


def test_a_one_example_file_says_why_there_is_no_eval_split(caplog):
    """`0 eval rows` and `eval loss n/a` had no reason given."""
    from peftkit.data.build import split_train_eval
    from peftkit.data.formats import Example

    one = [Example("f.jsonl:1", messages=({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}))]
    with caplog.at_level("WARNING"):
        assert split_train_eval(one, 0.2, seed=0) == (one, [])
    assert "No eval split: the training data holds 1 example" in caplog.text


def test_a_large_eval_file_is_warned_about_as_a_large_split_is(tmp_path, caplog):
    from peftkit.config.schema import DataConfig
    from peftkit.data.build import LARGE_EVAL_SPLIT, train_eval_examples

    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    train = write_jsonl(tmp_path / "train.jsonl", [record])
    big = write_jsonl(tmp_path / "eval.jsonl", [record] * (LARGE_EVAL_SPLIT + 1))
    with caplog.at_level("WARNING"):
        train_eval_examples(DataConfig(train=str(train), eval=str(big)), seed=0)
    assert f"data.eval holds {LARGE_EVAL_SPLIT + 1} examples, all evaluated at every evaluation" in caplog.text
