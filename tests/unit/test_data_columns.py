"""Records with other field names: auto-detected one-turn pairs and the recipe's `data.columns` map."""

from __future__ import annotations

import csv

import pytest

from peftkit.config.load import recipe_from_dict
from peftkit.config.schema import ColumnsConfig
from peftkit.config.validate import validate_recipe
from peftkit.data import load_examples
from peftkit.data.build import build_datasets
from peftkit.data.classification import load_labeled
from peftkit.errors import ConfigError, DataError
from tests.conftest import write_jsonl


def roles_and_texts(example) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in example.messages]


@pytest.mark.parametrize(
    ("record", "expected", "fmt"),
    [
        ({"question": "Capital of Peru?", "answer": "Lima."},
         [("user", "Capital of Peru?"), ("assistant", "Lima.")], "question/answer"),
        ({"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "summarization"},
         [("user", "Summarise.\n\nA long text."), ("assistant", "Short.")], "instruction/response"),
        ({"system_prompt": "Be terse.", "question": "2+2?", "response": "4", "id": "x1"},
         [("system", "Be terse."), ("user", "2+2?"), ("assistant", "4")], "question/response"),
        ({"query": "Solve x+1=2.", "response": "x = 1", "type": "MATH"},
         [("user", "Solve x+1=2."), ("assistant", "x = 1")], "query/response"),
        ({"input": "hello", "output": "hi there"}, [("user", "hello"), ("assistant", "hi there")], "input/output"),
    ],
)
def test_common_one_turn_field_pairs_are_detected(tmp_path, record, expected, fmt):
    [example] = load_examples(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert roles_and_texts(example) == expected
    assert example.format == fmt


def test_alpaca_and_prompt_completion_win_over_the_pairs(tmp_path):
    records = [{"instruction": "Say hi.", "input": "", "output": "Hi.", "response": "ignored"},
               {"prompt": "Q?", "completion": "A.", "response": "ignored"}]
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", records))
    assert [e.format for e in examples] == ["alpaca", "prompt_completion"]
    assert [e.messages[-1]["content"] for e in examples] == ["Hi.", "A."]


def test_a_null_alpaca_instruction_is_the_field_named(tmp_path):
    """With the input empty too, the instruction is what to fill in (the `input` -> `output` pair reading named the
    empty input); with an input, it is the prompt, as alpaca's instruction + input would make it."""
    with pytest.raises(DataError, match=r"d.jsonl:1: the prompt field 'instruction' is null, not text"):
        load_examples(write_jsonl(tmp_path / "d.jsonl", [{"instruction": None, "input": "", "output": "Hi."}]))
    [example] = load_examples(write_jsonl(tmp_path / "e.jsonl", [{"instruction": None, "input": "Hi?", "output": "Hi."}]))
    assert roles_and_texts(example) == [("user", "Hi?"), ("assistant", "Hi.")]


def test_numeric_answers_are_read_as_text(tmp_path):
    [example] = load_examples(write_jsonl(tmp_path / "d.jsonl", [{"question": "2 + 2?", "answer": 4}]))
    assert roles_and_texts(example)[-1] == ("assistant", "4")
    with pytest.raises(DataError, match="the response field 'answer' is a list, not text"):
        load_examples(write_jsonl(tmp_path / "e.jsonl", [{"question": "Q?", "answer": ["a"]}]))


def test_empty_detected_answer_names_the_field(tmp_path):
    with pytest.raises(DataError, match=r"d.jsonl:1: the response field 'answer' is empty"):
        load_examples(write_jsonl(tmp_path / "d.jsonl", [{"question": "Q?", "answer": "  "}]))


def test_chat_records_with_sharegpt_turns_and_a_record_system_prompt(tmp_path):
    records = [{"system": "You are terse.", "messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
               {"system": "ignored: the conversation has one", "messages": [
                   {"role": "system", "content": "own"}, {"role": "user", "content": "a"},
                   {"role": "assistant", "content": "b"}]}]
    first, second = load_examples(write_jsonl(tmp_path / "d.jsonl", records))
    assert roles_and_texts(first) == [("system", "You are terse."), ("user", "hi"), ("assistant", "yo")]
    assert roles_and_texts(second)[0] == ("system", "own")


def test_unrecognised_record_points_at_data_columns(tmp_path):
    with pytest.raises(DataError, match=r"keys: q, a\).*data: \{columns: \{prompt: q, response: a\}\}"):
        load_examples(write_jsonl(tmp_path / "d.jsonl", [{"q": "x", "a": "y"}]))


def test_columns_map_a_conversation_with_custom_speakers(tmp_path):
    records = [{"persona": "You are the bank's agent.", "dialog": [
        {"speaker": "customer", "text": "My card is blocked.", "ts": 1},
        {"speaker": "agent", "text": "I unblocked it."},
        {"speaker": "Human", "text": "Thanks!"},
        {"speaker": "agent", "text": "You are welcome.", "weight": 0}]}]
    columns = ColumnsConfig(messages="dialog", role="speaker", content="text", system="persona",
                            roles={"customer": "user", "agent": "assistant"})
    [example] = load_examples(write_jsonl(tmp_path / "d.jsonl", records), columns=columns)
    assert roles_and_texts(example) == [("system", "You are the bank's agent."), ("user", "My card is blocked."),
                                        ("assistant", "I unblocked it."), ("user", "Thanks!"),
                                        ("assistant", "You are welcome.")]
    assert example.messages[-1]["weight"] == 0, "per-turn weights survive the map"
    assert "ts" not in example.messages[1], "unknown turn keys are dropped"
    assert example.format == "columns"


def test_a_mapped_field_written_in_another_case_is_pointed_at(tmp_path):
    """Format detection and `columns.roles` ignore case; a `columns` field name does not, and the error only listed the
    record's fields."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Hours?", "answer": "9-5"}])
    with pytest.raises(DataError, match=r"the prompt field 'Question' is missing \(record fields: question, answer; "
                                        r"did you mean 'question'\? data.columns names are matched exactly"):
        load_examples(path, columns=ColumnsConfig(prompt="Question", response="answer"))
    with pytest.raises(DataError, match=r"the prompt field 'query' is missing \(record fields: question, answer\)$"):
        load_examples(path, columns=ColumnsConfig(prompt="query", response="answer"))


def test_columns_errors_name_the_field_and_the_fix(tmp_path):
    columns = ColumnsConfig(messages="dialog", role="speaker", content="text")
    path = write_jsonl(tmp_path / "d.jsonl", [{"dialog": [{"speaker": "customer", "text": "hi"}]}])
    with pytest.raises(DataError, match=r"d.jsonl:1: turn 1: speaker 'customer' is not a role.*data.columns.roles"):
        load_examples(path, columns=columns)
    path = write_jsonl(tmp_path / "e.jsonl", [{"conversation": []}])
    with pytest.raises(DataError, match=r"e.jsonl:1: the conversation field 'dialog' \(data.columns.messages\) is "
                                        r"missing \(record fields: conversation\)"):
        load_examples(path, columns=columns)
    path = write_jsonl(tmp_path / "f.jsonl", [{"dialog": [{"speaker": "user", "body": "hi"}]}])
    with pytest.raises(DataError, match=r"turn 1 has no text field 'text' \(data.columns.content; the turn has: speaker, body\)"):
        load_examples(path, columns=columns)
    pair = ColumnsConfig(prompt="ask", response="reply")
    with pytest.raises(DataError, match=r"the response field 'reply' is missing \(record fields: ask, answer\)"):
        load_examples(write_jsonl(tmp_path / "g.jsonl", [{"ask": "x", "answer": "y"}]), columns=pair)


def test_columns_map_a_csv_pair_with_input_and_system(tmp_path):
    path = tmp_path / "faq.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Frage", "Kontext", "Antwort", "Rolle"])
        writer.writerow(["Wann offen?", "", "Ab neun.", "Sei kurz."])
        writer.writerow(["Preis?", "Tarif B", "Zehn Euro.", ""])
    columns = ColumnsConfig(prompt="Frage", input="Kontext", response="Antwort", system="Rolle")
    first, second = load_examples(path, columns=columns)
    assert roles_and_texts(first) == [("system", "Sei kurz."), ("user", "Wann offen?"), ("assistant", "Ab neun.")]
    assert roles_and_texts(second) == [("user", "Preis?\n\nTarif B"), ("assistant", "Zehn Euro.")]


def test_a_source_the_columns_map_does_not_fit_at_all_is_read_in_its_detected_format(tmp_path, caplog):
    """`train: [faq.csv, chat.jsonl]` with a map written for the CSV: each source in its own format, as the README
    says of lists; a file the map fits in part keeps the map's error (a mistake in the data, not another format)."""
    faq = tmp_path / "faq.csv"
    faq.write_text("Frage,Antwort\nWann offen?,Ab neun.\n", encoding="utf-8")
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                {"role": "assistant", "content": "hello"}]}])
    columns = ColumnsConfig(prompt="Frage", response="Antwort")
    with caplog.at_level("INFO", logger="peftkit"):
        first, second = load_examples([faq, chat], columns=columns)
    assert roles_and_texts(first) == [("user", "Wann offen?"), ("assistant", "Ab neun.")]
    assert roles_and_texts(second) == [("user", "hi"), ("assistant", "hello")]
    assert "chat.jsonl: no record has the fields data.columns names, so it was read in its own chat format" in caplog.text
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"Frage": "a?", "Antwort": "b."}, {"question": "c?", "answer": "d."}])
    with pytest.raises(DataError, match="mixed.jsonl:2"):
        load_examples(mixed, columns=columns)
    custom = write_jsonl(tmp_path / "custom.jsonl", [{"Q": "a?", "A": "b."}])
    with pytest.raises(DataError, match="prompt field 'Frage' is missing"):
        load_examples([faq, custom], columns=columns)
    with pytest.raises(DataError, match="prompt field 'Frage' is missing"):  # one source: the map is meant for it
        load_examples(chat, columns=columns)
    typo = write_jsonl(tmp_path / "typo.jsonl", [{"text": "<p>raw</p>", "clean_text": "clean"}])
    with pytest.raises(DataError, match="the text field 'clean_txt'"):  # not the `text` field instead
        load_examples(typo, columns=ColumnsConfig(text="clean_txt"))
    with pytest.raises(DataError, match="prompt field 'Frage' is missing"):  # no source fits it
        load_examples([chat, chat], columns=columns)
    assert load_examples(chat, columns=columns, mapped_elsewhere=True)[0].format == "chat"  # data.eval beside mapped train


def test_columns_text_form_trains_plain_text(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "Plain domain text.", "id": 3}])
    [example] = load_examples(path, columns=ColumnsConfig(text="body"))
    assert example.text == "Plain domain text." and example.messages is None


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"prompt": "q"}, "needs both `prompt` and `response`"),
        ({"messages": "dialog", "prompt": "q", "response": "a"}, "found messages and prompt \\+ response"),
        ({"prompt": "q", "response": "a", "roles": {"bot": "assistant"}}, "set `messages` too"),
        ({"messages": "dialog", "roles": {"bot": "narrator"}}, "roles"),
        ({}, "name the fields of one form"),
        ({"text": "body", "system": "s"}, "not to plain text"),
    ],
)
def test_inconsistent_column_maps_are_refused(tiny_recipe, columns, message):
    tiny_recipe["data"]["columns"] = columns
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict(tiny_recipe)


def test_columns_and_task_must_agree(tiny_recipe):
    tiny_recipe["data"]["columns"] = {"prompt": "q", "response": "a"}
    tiny_recipe["data"]["format"] = "alpaca"
    with pytest.raises(ConfigError, match="data.format must stay auto"):
        recipe_from_dict(tiny_recipe)
    del tiny_recipe["data"]["format"]
    tiny_recipe["data"]["columns"] = {"text": "body", "label": "y"}
    with pytest.raises(ConfigError, match="chat training has no labels"):
        recipe_from_dict(tiny_recipe)
    tiny_recipe["task"] = "sequence_classification"
    tiny_recipe["data"]["columns"] = {"prompt": "q", "response": "a"}
    with pytest.raises(ConfigError, match="classification records are a text and a label"):
        recipe_from_dict(tiny_recipe)


def test_classification_columns(tmp_path):
    path = write_jsonl(tmp_path / "sst.jsonl", [{"sentence": "great film", "sentiment": 1},
                                                {"sentence": "dull", "sentiment": 0}])
    items = load_labeled(path, ColumnsConfig(text="sentence", label="sentiment"))
    assert [(i.text, i.label) for i in items] == [("great film", "1"), ("dull", "0")]
    with pytest.raises(DataError, match=r"need `text` and `label` \(found: sentence, sentiment\); map other field names "
                                        r"with data.columns"):
        load_labeled(path)


def test_recipe_with_columns_validates_and_builds(tiny_recipe, tiny_tokenizer, tmp_path):
    records = [{"ask": f"question {i}?", "reply": f"answer {i}.", "tone": "Be brief."} for i in range(8)]
    tiny_recipe["data"]["train"] = str(write_jsonl(tmp_path / "custom.jsonl", records))
    tiny_recipe["data"]["columns"] = {"prompt": "ask", "response": "reply", "system": "tone"}
    recipe = recipe_from_dict(tiny_recipe)
    validate_recipe(recipe, check_model=False)
    bundle = build_datasets(recipe.data, tiny_tokenizer, seed=0)
    assert len(bundle.train) + len(bundle.eval) == 8
    assert bundle.stats["train_formats"] == {"columns": len(bundle.train)}
    tiny_recipe["data"]["columns"] = {"prompt": "question", "response": "reply"}
    with pytest.raises(ConfigError, match=r"data.train: all 8 records of .*custom.jsonl \(first: .*custom.jsonl:1\): the prompt field 'question' is missing"):
        validate_recipe(recipe_from_dict(tiny_recipe), check_model=False)


def test_validate_reads_the_replay_set_as_training_does(tiny_recipe, tmp_path):
    """`data.format` describes train/eval; the built-in replay set (chat) must not be read as alpaca."""
    records = [{"instruction": f"Say {i}.", "output": f"{i}."} for i in range(8)]
    tiny_recipe["data"]["train"] = str(write_jsonl(tmp_path / "alpaca.jsonl", records))
    tiny_recipe["data"]["format"] = "alpaca"
    tiny_recipe["data"]["replay"] = {"path": "builtin:general", "answers": "dataset"}
    validate_recipe(recipe_from_dict(tiny_recipe), check_model=False)


def test_records_failing_the_same_way_are_named_once(tmp_path):
    records = [{"question": "Q1?", "answer": "A1."}, {"question": "Q2?", "answer": ""}, {"question": "Q3?", "answer": ""}]
    with pytest.raises(DataError, match=r"^2 of 3 records of .*d.jsonl \(first: .*d.jsonl:2\): the response field "
                                        r"'answer' is empty"):
        load_examples(write_jsonl(tmp_path / "d.jsonl", records))


def test_lmsys_style_conversation_field_is_read(tmp_path):
    record = {"conversation_id": "a1", "model": "x", "conversation": [
        {"role": "user", "content": "hi", "turn": 1}, {"role": "assistant", "content": "hello"}]}
    [example] = load_examples(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert roles_and_texts(example) == [("user", "hi"), ("assistant", "hello")]


def test_preference_records_get_their_own_advice(tmp_path):
    path = write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": "Q?", "chosen": "good", "rejected": "bad"}])
    with pytest.raises(DataError, match=r"a preference record .* map them: `data: \{columns: \{prompt: prompt, response: chosen\}\}`"):
        load_examples(path)
    [example] = load_examples(path, columns=ColumnsConfig(prompt="prompt", response="chosen"))
    assert roles_and_texts(example) == [("user", "Q?"), ("assistant", "good")]


def test_train_on_prompt_supervises_every_training_token_but_not_eval(tiny_recipe, tiny_tokenizer):
    from peftkit.data import IGNORE_INDEX

    tiny_recipe["data"]["system_prompt"] = "You are the library's assistant."
    plain = build_datasets(recipe_from_dict(tiny_recipe).data, tiny_tokenizer, seed=0)
    tiny_recipe["data"]["train_on_prompt"] = True
    recipe = recipe_from_dict(tiny_recipe)
    everything = build_datasets(recipe.data, tiny_tokenizer, seed=0)
    assert [r["input_ids"] for r in everything.train] == [r["input_ids"] for r in plain.train]
    assert all(r["labels"] == r["input_ids"] for r in everything.train)
    assert everything.eval == plain.eval, "the eval loss stays on the replies"
    assert everything.stats["train_supervised_tokens"] > 2 * plain.stats["train_supervised_tokens"]
    # each row's first token is labelled but never predicted: the count is what the shifted loss trains
    assert everything.stats["train_supervised_tokens"] == sum(len(r["input_ids"]) - 1 for r in everything.train)
    assert any(label == IGNORE_INDEX for r in plain.train for label in r["labels"])


def test_train_on_inputs_is_pointed_at_train_on_prompt(tiny_recipe):
    tiny_recipe["data"]["train_on_inputs"] = True
    with pytest.raises(ConfigError, match="unknown key `data.train_on_inputs`: did you mean `train_on_prompt`"):
        recipe_from_dict(tiny_recipe)
    del tiny_recipe["data"]["train_on_inputs"]
    tiny_recipe["data"]["train_on_prompt"] = True
    tiny_recipe["task"] = "sequence_classification"
    with pytest.raises(ConfigError, match="train_on_prompt is for chat training"):
        recipe_from_dict(tiny_recipe)


def test_the_recipes_speaker_map_ignores_case_as_the_usual_spellings_do(tmp_path):
    """`roles: {customer: user}` against a `Customer` speaker said to map it in data.columns.roles: the map it had."""
    records = [{"turns": [{"speaker": "Customer", "text": "hi"}, {"speaker": "AGENT", "text": "hello"}]}]
    columns = ColumnsConfig(messages="turns", role="speaker", content="text", roles={"customer": "user", "agent": "assistant"})
    [example] = load_examples(write_jsonl(tmp_path / "d.jsonl", records), columns=columns)
    assert roles_and_texts(example) == [("user", "hi"), ("assistant", "hello")]


@pytest.mark.parametrize("record", [
    {"conversations": [{"from": "kunde", "value": "Hallo"}, {"from": "gpt", "value": "Guten Tag."}]},
    {"conversation": [{"from": "kunde", "value": "Hallo"}, {"from": "gpt", "value": "Guten Tag."}]},
    {"messages": [{"from": "kunde", "value": "Hallo"}, {"from": "gpt", "value": "Guten Tag."}]},
    {"messages": [{"role": "kunde", "content": "Hallo"}, {"role": "assistant", "content": "Guten Tag."}]},
    {"messages": [{"role": "[Kunde]", "content": "Hallo"}, {"role": "assistant", "content": "Guten Tag."}]},
    {"messages": [{"role": "1", "content": "Hallo"}, {"role": "assistant", "content": "Guten Tag."}]}])
def test_an_unknown_speaker_is_told_the_whole_columns_map_that_reads_it(tmp_path, record):
    """`roles` alone is refused (it describes a conversation field's turns): the advice is a map that works."""
    import re

    import yaml

    path = write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(DataError) as caught:
        load_examples(path)
    advice = re.search(r"`data.columns: (\{.*\})`", str(caught.value))
    assert advice, str(caught.value)
    columns = ColumnsConfig(**yaml.safe_load(advice.group(1)))
    assert roles_and_texts(load_examples(path, columns=columns)[0]) == [("user", "Hallo"), ("assistant", "Guten Tag.")]


def test_turns_whose_text_has_another_key_are_told_the_map_that_reads_them(tmp_path):
    import re

    import yaml

    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "text": "Hi"},
                                                            {"role": "assistant", "text": "Hello."}]}])
    with pytest.raises(DataError, match="message 1 must be an object with `role` and `content`; its text is under `text`"
                       ) as caught:
        load_examples(path)
    columns = ColumnsConfig(**yaml.safe_load(re.search(r"`data.columns: (\{.*\})`", str(caught.value)).group(1)))
    assert roles_and_texts(load_examples(path, columns=columns)[0]) == [("user", "Hi"), ("assistant", "Hello.")]


def test_prompt_completion_lists_get_no_map_they_cannot_use(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": [{"role": "kunde", "content": "Hallo"}],
                                               "completion": [{"role": "assistant", "content": "Tag."}]}])
    with pytest.raises(DataError, match=r"unknown role 'kunde'.*\(or map other speakers with data.columns.roles\)$"):
        load_examples(path)
