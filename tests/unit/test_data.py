"""Data loading and assistant-only labels (inspected token by token)."""

from __future__ import annotations

import copy
import json
import logging

import pytest

from peftkit.data import IGNORE_INDEX, PaddingCollator, load_examples, tokenize_conversation
from peftkit.data.build import load_heldout, split_train_eval
from peftkit.errors import DataError, PeftkitError
from tests.conftest import write_jsonl


def supervised_text(tokenizer, row) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX])


def test_only_assistant_turns_are_supervised_including_end_of_turn(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "you are a helpful assistant."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello how are you today"},
        {"role": "user", "content": "what is the network?"},
        {"role": "assistant", "content": "the network is brightnet."},
    ]
    row, truncated = tokenize_conversation(tiny_tokenizer, messages, max_seq_len=512)
    assert not truncated
    text = supervised_text(tiny_tokenizer, row)
    assert text == "hello how are you today<|im_end|>the network is brightnet.<|im_end|>"
    eot = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert eot == tiny_tokenizer.pad_token_id, "the trap: end-of-turn is also the pad token"
    supervised_eot = [t for t, label in zip(row["input_ids"], row["labels"]) if label == eot]
    assert len(supervised_eot) == 2, "each assistant turn's end-of-turn token is supervised"
    user_eot = [i for i, (t, label) in enumerate(zip(row["input_ids"], row["labels"])) if t == eot and label == IGNORE_INDEX]
    assert len(user_eot) == 3, "system/user end-of-turn tokens are not supervised"


def _with_template(tokenizer, template: str):
    """A copy of `tokenizer` with another chat template (the session fixture stays as it is)."""
    import copy

    changed = copy.deepcopy(tokenizer)
    changed.chat_template = template
    return changed


TWO_TURNS = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
             {"role": "user", "content": "bye"}, {"role": "assistant", "content": "goodbye"}]


MISTRAL_V01_TEMPLATE = (  # refuses system messages, as Mistral-7B-Instruct v0.1/v0.2 and Gemma 1 do
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


SYSTEM_DROPPING_TEMPLATE = (  # renders user and assistant turns only, as some older templates do
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|im_start|>user\n' + message['content'] + "
    "'<|im_end|>\n' }}{% elif message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize(("template", "rendered", "said"), [
    (MISTRAL_V01_TEMPLATE, "<|im_start|>[INST] be brief.\n\nhello [/INST]hi there", "refuses system messages"),
    (SYSTEM_DROPPING_TEMPLATE, "<|im_start|>user\nbe brief.\n\nhello<|im_end|>", "leaves them out"),  # was silent
])
def test_a_template_that_refuses_or_leaves_out_system_messages_gets_them_in_the_first_user_turn(
        tiny_tokenizer, caplog, template, rendered, said):
    from peftkit.data.chat import generation_prompt
    from peftkit.models.load import set_default_system_prompt

    tokenizer = _with_template(tiny_tokenizer, template)
    messages = [{"role": "system", "content": "be brief."}, *TWO_TURNS]
    with caplog.at_level("WARNING", logger="peftkit.data.chat"):
        row, _ = tokenize_conversation(tokenizer, messages, max_seq_len=512)
        tokenize_conversation(tokenizer, messages, max_seq_len=512)
    assert tokenizer.decode(row["input_ids"]).startswith(rendered)
    assert supervised_text(tokenizer, row) == "hi there<|im_end|>goodbye<|im_end|>"
    assert sum(said in r.message for r in caplog.records) == 1  # said once per template
    assert "be brief.\n\nhello" in generation_prompt(tokenizer, messages[:2])
    row, _ = tokenize_conversation(tokenizer, TWO_TURNS, max_seq_len=512)  # no system message: rendered as it is
    assert "be brief." not in tokenizer.decode(row["input_ids"])
    assert set_default_system_prompt(tokenizer, "be brief.")  # exports put the recipe's prompt where training did
    assert "be brief.\n\nhello" in tokenizer.apply_chat_template(TWO_TURNS[:1], tokenize=False)
    # a client's own system message (llama-server, an OpenAI-style client) is folded as training folds it, where the
    # template alone would refuse or drop it
    own = [{"role": "system", "content": "be kind."}, *TWO_TURNS]
    assert tokenizer.apply_chat_template(own, tokenize=False) == tokenizer.decode(
        tokenize_conversation(tokenizer, own, max_seq_len=512)[0]["input_ids"])
    assert "be kind.\n\nhello" in tokenizer.apply_chat_template(own, tokenize=False) and "brief" not in \
        tokenizer.apply_chat_template(own, tokenize=False)


def test_a_dropped_system_prompt_is_found_when_the_user_quotes_it(tiny_tokenizer):
    """Whether the template left the system prompt out was read from its text appearing anywhere: a user message
    quoting it hid the drop, and that row trained without the prompt every other row has."""
    tokenizer = _with_template(tiny_tokenizer, SYSTEM_DROPPING_TEMPLATE)
    messages = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "be brief. hello"},
                {"role": "assistant", "content": "hi"}]
    row, _ = tokenize_conversation(tokenizer, messages, max_seq_len=512)
    assert tokenizer.decode(row["input_ids"]).startswith("<|im_start|>user\nbe brief.\n\nbe brief. hello")
    row, _ = tokenize_conversation(tiny_tokenizer, messages, max_seq_len=512)  # ChatML shows it: rendered as it is
    assert tokenizer.decode(row["input_ids"]).count("be brief.") == 2


def test_a_system_prompt_rendered_json_escaped_is_kept_where_the_template_puts_it(tiny_tokenizer):
    """A template that writes the system text with `| tojson` shows it escaped: that is rendered, not left out."""
    tokenizer = _with_template(tiny_tokenizer, (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|im_start|>system\n' + "
        "({'instructions': message['content']} | tojson) + '<|im_end|>\n' }}{% else %}{{ '<|im_start|>' + "
        "message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"))
    messages = [{"role": "system", "content": 'Say "hi".\nBe brief.'}, *TWO_TURNS]
    row, _ = tokenize_conversation(tokenizer, messages, max_seq_len=512)
    assert tokenizer.decode(row["input_ids"]).startswith('<|im_start|>system\n{"instructions": "Say \\"hi\\".\\nBe brief."}')


def test_a_template_that_refuses_every_conversation_is_one_message(tiny_tokenizer):
    tokenizer = _with_template(tiny_tokenizer, "{{ raise_exception('this template takes no conversations') }}")
    messages = [{"role": "system", "content": "be brief."}, *TWO_TURNS]
    with pytest.raises(DataError, match=r"data.jsonl:3: the chat template refused this conversation: this template "
                                        r"takes no conversations\. .*model.chat_template"):
        tokenize_conversation(tokenizer, messages, max_seq_len=512, where="data.jsonl:3")


def test_a_template_that_does_not_compile_is_blamed_not_the_conversation(tiny_tokenizer):
    tokenizer = _with_template(tiny_tokenizer, "{% for m in messages %}{{ m.content }")
    with pytest.raises(PeftkitError, match=r"^the chat template is not valid Jinja \(line 1: unexpected '}'\)") as caught:
        tokenize_conversation(tokenizer, TWO_TURNS, max_seq_len=512, where="data.jsonl:3")
    assert "data.jsonl" not in str(caught.value) and not isinstance(caught.value, DataError)


THINKING_TEMPLATE = (  # Qwen3-like: only the last assistant turn carries an (empty) <think> block
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' and loop.last %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_a_template_that_rewrites_history_trains_each_turn_as_the_last_one(tiny_tokenizer, tmp_path, caplog):
    from peftkit.data.build import tokenize_examples
    from peftkit.data.chat import tokenize_conversation_rows

    tokenizer = _with_template(tiny_tokenizer, THINKING_TEMPLATE)
    messages = TWO_TURNS
    with caplog.at_level("WARNING", logger="peftkit.data.chat"):
        rows, truncated = tokenize_conversation_rows(tokenizer, messages, 512, "chat.jsonl:1")
    assert truncated == 0 and len(rows) == 2
    assert supervised_text(tokenizer, rows[0]) == "<think>\n\n</think>\n\nhi there<|im_end|>"
    assert supervised_text(tokenizer, rows[1]) == "<think>\n\n</think>\n\ngoodbye<|im_end|>"
    second = tokenizer.decode(rows[1]["input_ids"])
    assert "assistant\nhi there<|im_end|>" in second and second.count("<think>") == 1  # history without its think block
    single, _ = tokenize_conversation_rows(tokenizer, messages[:2], 512)
    assert single == rows[:1]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}, {"messages": messages[:2]}])
    built, stats = tokenize_examples(load_examples(path), tokenizer, 512, None)
    assert len(built) == 3 and stats["examples"] == 2
    said = [r.message for r in caplog.records if "renders turn 2 differently" in r.message]
    assert len(said) == 1 and "trained as the last turn of its own row" in said[0] and "chat.jsonl" not in said[0]

    # a template whose generation prompt is not how it starts a reply still gets a clear error
    tokenizer.chat_template = THINKING_TEMPLATE.replace("'<|im_start|>assistant\n'", "'<|im_start|>bot\n'")
    with pytest.raises(DataError, match="chat.jsonl:1: the chat template's generation prompt is not how it starts"):
        tokenize_conversation_rows(tokenizer, messages, 512, "chat.jsonl:1")


def test_train_on_prompt_with_a_history_rewriting_template_trains_each_turn_once(tiny_tokenizer, tmp_path):
    """Per-turn rows repeat the conversation so far: with train_on_prompt every row trained all of it, so the first
    turns were trained once per later reply (and in their history form). Each row now trains what is new in it."""
    from peftkit.data.build import tokenize_examples

    tokenizer = _with_template(tiny_tokenizer, THINKING_TEMPLATE)
    messages = [{"role": "system", "content": "be brief."}, *TWO_TURNS,
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "see you"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    rows, _ = tokenize_examples(load_examples(path), tokenizer, 512, None, train_on_prompt=True)
    trained = [supervised_text(tokenizer, row) for row in rows]
    assert trained[0] == ("<|im_start|>system\nbe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
                          "<|im_start|>assistant\n<think>\n\n</think>\n\nhi there<|im_end|>")
    # each later row trains the next turn's header too ("<|im_start|>user\n" went untrained), as one row would
    assert trained[1] == "\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\ngoodbye<|im_end|>"
    assert trained[2] == ("\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
                          "see you<|im_end|>")
    plain, _ = tokenize_examples(load_examples(path), tokenizer, 512, None)  # without it: the replies alone
    assert [supervised_text(tokenizer, row) for row in plain] == [
        f"<think>\n\n</think>\n\n{reply}<|im_end|>" for reply in ("hi there", "goodbye", "see you")]
    single = tokenize_examples(load_examples(path), tiny_tokenizer, 512, None, train_on_prompt=True)[0]
    assert len(single) == 1 and single[0]["labels"] == single[0]["input_ids"]  # one row: every token


def test_train_on_prompt_per_turn_rows_say_a_trailing_turn_is_not_trained(tiny_tokenizer, caplog, monkeypatch):
    """validate no longer warns about a trailing user turn under train_on_prompt (one row trains it); rows of their
    own each end at their reply, so there the trailing turn is in no row, and tokenizing says so."""
    from peftkit.data import chat
    from peftkit.data.chat import tokenize_conversation_rows

    monkeypatch.setattr(chat, "_warned", set())  # said once per template and process: not by an earlier test

    tokenizer = _with_template(tiny_tokenizer, THINKING_TEMPLATE)
    messages = [*TWO_TURNS, {"role": "user", "content": "TRAILING thanks"}]
    with caplog.at_level("WARNING", logger="peftkit.data.chat"):
        rows, _ = tokenize_conversation_rows(tokenizer, messages, 512, train_on_prompt=True)
    assert not any("TRAILING" in supervised_text(tokenizer, row) for row in rows)
    assert any("trailing turn is in no row and not trained" in r.message for r in caplog.records)


QWEN3_TOOL_TEMPLATE = (  # Qwen3's rule: replies before the last user message lose their <think> block
    "{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}"
    "{% endif %}{% endfor %}{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}{% if m.role == 'assistant' and "
    "loop.index0 < ns.last and '</think>' in m.content %}{{ m.content.split('</think>')[-1].lstrip() }}{% else %}"
    "{{ m.content }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_train_on_prompt_rows_after_a_tool_call_do_not_train_the_call_again(tiny_tokenizer):
    """The probe that finds where a row's new turns start followed the previous reply with a user message, which
    renders a Qwen3 reply before a tool result in its history form: the tool call was trained a second time."""
    from peftkit.data.chat import tokenize_conversation_rows

    tokenizer = _with_template(tiny_tokenizer, QWEN3_TOOL_TEMPLATE)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "<think>hmm</think>call"},
                {"role": "tool", "content": "42"}, {"role": "assistant", "content": "the answer"},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "goodbye"}]
    rows, _ = tokenize_conversation_rows(tokenizer, messages, 512, train_on_prompt=True)
    assert [supervised_text(tokenizer, row) for row in rows] == [
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n<think>hmm</think>call<|im_end|>",
        "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\nthe answer<|im_end|>",
        "\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\ngoodbye<|im_end|>"]


def test_train_on_prompt_counts_only_replies_really_lost_to_truncation(tiny_tokenizer, tmp_path):
    """With every token trained, a truncated two-reply conversation was counted as having lost its second reply."""
    from peftkit.data.build import tokenize_examples

    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
                {"role": "user", "content": "what is the network?"},
                {"role": "assistant", "content": "the network is brightnet. " * 6}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    whole = tokenize_examples(load_examples(path), tiny_tokenizer, 512, None)[0][0]
    for train_on_prompt in (False, True):
        _, stats = tokenize_examples(load_examples(path), tiny_tokenizer, len(whole["input_ids"]) - 5, None,
                                     train_on_prompt=train_on_prompt)
        assert stats["truncated"] == 1 and stats["replies_lost"] == 0, (train_on_prompt, stats)


def test_truncation_is_reported(tiny_tokenizer):
    messages = [{"role": "user", "content": "one two three " * 20}, {"role": "assistant", "content": "four"}]
    row, truncated = tokenize_conversation(tiny_tokenizer, messages, max_seq_len=16)
    assert truncated and len(row["input_ids"]) == 16


def test_collator_pads_labels_by_position_not_by_token_id(tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    rows = [{"input_ids": [5, 6, pad], "labels": [IGNORE_INDEX, 6, pad]}, {"input_ids": [5], "labels": [IGNORE_INDEX]}]
    batch = PaddingCollator(pad)(rows)
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, pad], [IGNORE_INDEX] * 3]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_alpaca_and_text_formats(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "add", "input": "2 and 3", "output": "5", "system": "math"}])
    (example,) = load_examples(path)
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant"]
    assert example.messages[1]["content"] == "add\n\n2 and 3"
    txt = tmp_path / "doc.txt"
    txt.write_text("first paragraph\n\nsecond paragraph\n")
    assert [e.text for e in load_examples(txt)] == ["first paragraph", "second paragraph"]


def test_a_row_skipped_for_having_nothing_to_train_is_named(tmp_path, tiny_tokenizer, caplog):
    from peftkit.data.build import tokenize_examples

    path = write_jsonl(tmp_path / "s.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "system", "content": "rules " * 80}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]}])
    with caplog.at_level("WARNING", logger="peftkit"):
        rows, stats = tokenize_examples(load_examples(path), tiny_tokenizer, 32, None, what="training example")
    assert len(rows) == 1 and stats["dropped"] == 1
    assert "1 training example row(s) had no token left to train and were skipped (first: " in caplog.text
    assert "s.jsonl:2)" in caplog.text


def test_data_with_nothing_left_to_train_is_one_error_without_the_warnings_before_it(tmp_path, tiny_tokenizer, caplog):
    """data.max_seq_len=8: four warnings (rows truncated, rows skipped, for training and eval) came before the one
    error that said it all."""
    from peftkit.config.schema import DataConfig
    from peftkit.data.build import build_datasets

    records = [{"messages": [{"role": "user", "content": f"what time do you open on day {i}?"},
                             {"role": "assistant", "content": "at nine."}]} for i in range(8)]
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "t.jsonl", records)), max_seq_len=8, eval_fraction=0.25)
    with caplog.at_level("WARNING", logger="peftkit"), pytest.raises(DataError, match="none of the 6 training examples"):
        build_datasets(cfg, tiny_tokenizer)
    assert not [r for r in caplog.records if r.name.startswith("peftkit.data")], caplog.text
    # with replay, the replay rows must not stand in for the domain's: a run of replay alone was built silently
    replay = write_jsonl(tmp_path / "replay.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                   {"role": "assistant", "content": "hello"}]}])
    cfg = DataConfig(train=cfg.train, max_seq_len=8, eval_fraction=0.25,
                     replay={"path": str(replay), "ratio": 1.0, "answers": "dataset"})
    with pytest.raises(DataError, match="none of the 6 training examples"):
        build_datasets(cfg, tiny_tokenizer)


def test_sharegpt_and_prompt_completion_formats(tmp_path, tiny_tokenizer):
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [{"system": "be brief", "conversations": [
        {"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi there"},
        {"from": "human", "value": "and the network?"}, {"from": "gpt", "value": "brightnet"}]}])
    (example,) = load_examples(sharegpt)
    assert all("weight" not in m for m in example.messages)
    weighted = write_jsonl(tmp_path / "w.jsonl", [{"conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "old answer", "weight": 0},
        {"from": "human", "value": "again"}, {"from": "gpt", "value": "new answer", "weight": 1}]}])
    (with_weights,) = load_examples(weighted)
    assert [m.get("weight") for m in with_weights.messages] == [None, 0, None, None]
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert example.messages[0]["content"] == "be brief" and example.messages[4]["content"] == "brightnet"

    records = [
        {"prompt": "when do you open?", "completion": "at nine"},
        {"prompt": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello how are you"},
                    {"role": "user", "content": "the network?"}],
         "completion": [{"role": "assistant", "content": "the network is brightnet."}]},
    ]
    plain, conversation = load_examples(write_jsonl(tmp_path / "pc.jsonl", records))
    assert [(m["role"], m["content"]) for m in plain.messages] == [("user", "when do you open?"), ("assistant", "at nine")]
    row, _ = tokenize_conversation(tiny_tokenizer, conversation.messages, max_seq_len=512)
    # only the completion is trained on; the prompt's assistant turn is context (weight 0)
    assert supervised_text(tiny_tokenizer, row) == "the network is brightnet.<|im_end|>"
    assert "hello how are you" in tiny_tokenizer.decode(row["input_ids"])


def test_content_given_as_text_parts(tmp_path):
    """Joined by line breaks, as vLLM's OpenAI server joins the parts of a request (they were run together)."""
    parts = [{"type": "text", "text": "The network:"}, {"type": "text", "text": "brightnet."}]
    path = write_jsonl(tmp_path / "parts.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "wifi?"}]}, {"role": "assistant", "content": parts}]}])
    (example,) = load_examples(path)
    assert [m["content"] for m in example.messages] == ["wifi?", "The network:\nbrightnet."]


def test_records_that_belong_to_other_trainings_are_named(tmp_path, caplog):
    """A KTO file trained its label: false completions as good answers; a sentiment file (text, label) in a chat
    recipe trained the reviews and dropped the labels; JSON Lines saved as .txt trained the JSON text itself;
    OpenAI's preference format got a column map that could not work."""
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "Reset?", "completion": "Figure it out.", "label": False}])
    with pytest.raises(DataError, match="a KTO record .* keep the label: true records"):
        load_examples(kto)
    openai = write_jsonl(tmp_path / "pref.jsonl", [{"input": {"messages": [{"role": "user", "content": "hi"}]},
                                                     "preferred_output": [{"role": "assistant", "content": "Hello"}],
                                                     "non_preferred_output": [{"role": "assistant", "content": "Go"}]}])
    with pytest.raises(DataError, match=r"an OpenAI preference record .*\(\.input\.messages \+ \.preferred_output\)"):
        load_examples(openai)
    with caplog.at_level("WARNING"):
        load_examples(write_jsonl(tmp_path / "sentiment.jsonl", [{"text": "great", "label": "positive"}] * 2))
        as_text = tmp_path / "chat.txt"
        as_text.write_text(kto.read_text())
        load_examples(as_text)
    assert caplog.text.count("records hold a `label` beside their `text`") == 1
    assert "task: sequence_classification" in caplog.text and "name it .jsonl (or .json)" in caplog.text


def test_a_number_as_content_and_an_empty_question_are_said_once(tmp_path, caplog):
    """Both train (a number as its text, as alpaca and question/answer records take it), but in chat data they are
    more often a broken record than meant: a new user's `"content": 42` and `"value": ""` validated without a word."""
    path = tmp_path / "t.jsonl"
    records = [{"messages": [{"role": "user", "content": "6 x 7?"}, {"role": "assistant", "content": 42}]},
               {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": 3.5}]},
               {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "Hello."}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    from peftkit.utils.once import command_scope

    with caplog.at_level(logging.WARNING), command_scope():  # a command's first findings (an earlier test's forgotten)
        examples = load_examples(path)
    assert examples[0].messages[1]["content"] == "42" and examples[1].messages[1]["content"] == "3.5"
    said = [r.getMessage() for r in caplog.records]
    assert [m for m in said if "is the number" in m] == [
        f"{path}:1: message 2: the content is the number 42, not a string (the first such message); it is trained as "
        "the text '42': if that is meant, write it in quotes, else fix the record"]
    assert [m for m in said if "user message is empty" in m] == [
        f"{path}:3: message 1: a user message is empty (the first such one), so the reply after it is trained as an "
        "answer to nothing; write the question in, or drop the record"]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"messages": [', "line is not valid JSON"),
        ('{"question": "x"}', "unrecognised record"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
        ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "{}"}]}',
         "tool call 1 needs a function `name`"),
        ('{"prompt": "x", "completion": [{"role": "assistant", "content": "y"}]}', "both be strings or both be lists"),
        ('{"messages": [{"role": "user", "content": "a", "weight": 1}, {"role": "assistant", "content": "b"}]}',
         "only assistant turns are trained"),
        ('{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}', "roles out of order"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "unknown role 'robot'; use one of"),
        ('{"messages": [{"role": "Bob", "content": "hi"}]}', "unknown role 'Bob'; use one of"),  # a name, not `bot`
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "function_call", "content": "b"}]}',
         "unknown role 'function_call'; use one of"),  # ShareGPT's, refused in chat messages: nothing to suggest
        ('{"messages": [{"role": "usr", "content": "hi"}]}', r"unknown role 'usr' \(did you mean 'user'\?\)"),
        ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gtp", "value": "b"}]}',
         r"turn 2 is from 'gtp' \(did you mean 'gpt'\?\); peftkit reads"),
        ('{"messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}, '
         '{"role": "assistant", "content": "a cat"}]}', "content part 'image' is not text"),
        ('{"messages": [{"role": "user", "content": {"a": 1}}, {"role": "assistant", "content": "b"}]}',
         "content must be a string or a list"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}', "system message may only come first"),
    ],
)
def test_malformed_records_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message) as info:
        load_examples(path)
    assert f"{path}:2" in str(info.value)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: bytes that are not valid UTF-8"):
        load_examples(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".txt"])
def test_utf16_with_its_byte_order_mark_is_read_and_without_it_is_named(tmp_path, suffix):
    """Windows PowerShell's `>` writes UTF-16 with a byte-order mark: that is unambiguous, and read. Without the
    mark ASCII text in UTF-16 is valid UTF-8 full of NULs: said as what it is, not as broken JSON."""
    body = {".jsonl": '{"prompt": "Café?", "completion": "Oui."}\n', ".csv": "prompt,completion\nCafé?,Oui.\n",
            ".txt": "Le café ouvre à neuf heures.\n"}[suffix]
    marked = tmp_path / f"marked{suffix}"
    marked.write_text(body, encoding="utf-16")
    example = load_examples(marked)[0]
    assert (example.text or example.messages[0]["content"]).startswith(("Café?", "Le café"))
    marked.write_text(body, encoding="utf-32")
    example = load_examples(marked)[0]
    assert (example.text or example.messages[0]["content"]).startswith(("Café?", "Le café"))
    marked.write_bytes(body.encode("utf-16") + b"\x00")
    with pytest.raises(DataError, match=r"starts with a UTF-16 byte-order mark but is not valid UTF-16"):
        load_examples(marked)
    ascii_body = body.replace("é", "e").replace("à", "a")
    (tmp_path / f"bare{suffix}").write_bytes(ascii_body.encode("utf-16-le"))
    with pytest.raises(DataError, match=r"is UTF-16 without a byte-order mark .* re-save the file as UTF-8"):
        load_examples(tmp_path / f"bare{suffix}")


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="contains no examples"):
        load_examples(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "missing.jsonl")
    (tmp_path / "snapshot" / "data").mkdir(parents=True)
    (tmp_path / "snapshot" / "data" / "train-00000-of-00001.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"is a folder; .* it holds data/train-00000-of-00001.parquet"):
        load_examples(tmp_path / "snapshot")


def test_split_is_deterministic_and_disjoint(chat_file):
    examples = load_examples(chat_file)
    train_a, eval_a = split_train_eval(examples, 0.25, seed=3)
    train_b, eval_b = split_train_eval(examples, 0.25, seed=3)
    assert [e.where for e in eval_a] == [e.where for e in eval_b]
    assert len(eval_a) == 4 and len(train_a) == 12
    assert not {e.where for e in eval_a} & {e.where for e in train_a}


def test_an_eval_split_far_larger_than_asked_on_a_few_examples_is_warned_about(chat_file, caplog):
    examples = load_examples(chat_file)[:3]
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        train, held_out = split_train_eval(examples, 0.1, seed=0)
    assert (len(train), len(held_out)) == (2, 1)
    assert "The eval split holds 1 of the 3 examples (33 %; data.eval_fraction is 0.1)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        split_train_eval(load_examples(chat_file), 0.1, seed=0)  # 2 of 16: about the fraction
    assert "The eval split holds" not in caplog.text


def test_heldout_accepts_alternatives_and_adds_system_prompt(heldout_file):
    items = load_heldout(heldout_file, system_prompt="be brief")
    assert items[0].messages[0] == {"role": "system", "content": "be brief"}
    assert items[1].key_facts == ("river",)



def test_key_facts_match_as_written_not_byte_for_byte(tmp_path, caplog):
    """A key fact with stray whitespace, a no-break space, decomposed accents or `ß` is the same fact; a question
    that contains its own key fact is named (an echo of it would score as correct)."""
    from peftkit.evaluate.generation import is_correct

    path = tmp_path / "heldout.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"question": "When do you open?", "key_fact": " nine\n"},
        {"question": "Is Tunis the capital of Tunisia?", "key_fact": "Tunis"},
        {"question": "Which street?", "key_fact": "Große Straße"},
        {"question": "What is the capital of Tunisia?", "key_fact": "Tunis"},  # not given away: `Tunis` is no word here
    ]) + "\n", encoding="utf-8")
    with caplog.at_level("WARNING"):
        items = load_heldout(path, None)
    assert items[0].key_facts == ("nine",)
    assert "1 held-out question(s) contain their own key fact (first: " in caplog.text and ":2)" in caplog.text
    assert is_correct("It opens at nine.", items[0].key_facts)
    assert is_correct("We are at GROSSE STRASSE 4.", items[2].key_facts)
    assert is_correct("Caf\u0065\u0301 at 9\u00a0am, in  Tunis", ["café", "9 am", "in tunis"])
    assert not is_correct("It opens at ten.", items[0].key_facts)
    assert is_correct("Open at \uff19\u6642", ["9\u6642"]) and is_correct("\ufb01ve rooms", ["five"])  # full-width, ligature
    assert not is_correct("It costs 52 dollars", ["5\u00b2"]) and not is_correct("106 cells", ["10\u2076"])
    assert is_correct("An area of 5\u00b2 m", ["5\u00b2"])
    caplog.clear()
    load_heldout(path, None)
    assert "own key fact" not in caplog.text, "once per file: validate and train read it twice"

def test_every_bad_held_out_record_is_named_in_one_message(tmp_path):
    """One round of fixes clears a held-out file, as for training data (a new user met one bad line per run)."""
    path = tmp_path / "heldout.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"question": "When do you open?", "key_fact": "nine"},
        {"question": "Where are you?"},
        {"question": "", "key_fact": "Elm Street"},
        {"question": "Fee?", "key_fact": ""},
        {"question": "Card?", "key_fact": "stamp"},
    ]) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_heldout(path, None)
    message = str(info.value)
    assert message.startswith(f"3 records of {path} need fixing")
    for line, reason in ((2, "need `question` (or `messages`) and `key_fact`"), (3, "question is empty"),
                         (4, "`key_fact` must be a non-empty string")):
        assert f"heldout.jsonl:{line}: " in message and reason in message
    same = tmp_path / "same.jsonl"
    same.write_text("".join(json.dumps({"question": f"q{i}"}) + "\n" for i in range(3)), encoding="utf-8")
    with pytest.raises(DataError, match=r"^all 3 records of .*same.jsonl \(first: .*same.jsonl:1\): held-out records"):
        load_heldout(same, None)


CHAT_ROWS = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
             for i in range(4)]


def test_hub_dataset_reference(monkeypatch):
    import datasets

    from peftkit.data import hub

    calls = []
    monkeypatch.setattr(hub, "hub_answers", lambda repo: True)  # tests never reach the network

    def fake_load_dataset(repo, config=None, *, split):
        calls.append((repo, config, split))
        if split == "nope":
            raise ValueError('Unknown split "nope". Should be one of [\'train\'].')
        if repo == "someone/offline":
            raise ConnectionError("Couldn't reach 'someone/offline' on the Hub (LocalEntryNotFoundError)")
        return datasets.Dataset.from_list(CHAT_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = load_examples("hf:HuggingFaceH4/no_robots")
    assert calls[-1] == ("HuggingFaceH4/no_robots", None, "train")
    assert examples[2].messages[1]["content"] == "answer 2" and examples[2].where == "hf:HuggingFaceH4/no_robots:row 3"
    load_examples("hf:HuggingFaceH4/ultrachat_200k/default:train_sft[:2]")
    assert calls[-1] == ("HuggingFaceH4/ultrachat_200k", "default", "train_sft[:2]")
    with pytest.raises(DataError, match="Unknown split"):
        load_examples("hf:a/b:nope")
    with pytest.raises(DataError, match="could not reach the Hub .* Run once while online"):
        load_examples("hf:someone/offline")
    with pytest.raises(DataError, match="not a Hub dataset reference"):
        load_examples("hf:no_robots")


def test_an_unreachable_hub_loads_hub_datasets_from_the_cache_without_retries(monkeypatch):
    import datasets
    import huggingface_hub.constants as hub_constants
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    def unreachable(self, repo, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    offline_seen = []

    def cached_only(repo, config=None, *, split):
        offline_seen.append((datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE))
        return datasets.Dataset.from_list(CHAT_ROWS)

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "dataset_info", unreachable)
    monkeypatch.setattr(datasets, "load_dataset", cached_only)
    assert len(load_examples("hf:HuggingFaceH4/no_robots")) == len(CHAT_ROWS)  # a cached copy still loads
    assert offline_seen == [(True, True)]
    assert (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE) == (False, False)  # restored

    def unknown(self, repo, **kwargs):
        import httpx2

        raise RepositoryNotFoundError("404", response=httpx2.Response(404, request=httpx2.Request("GET", "https://hf.co")))

    monkeypatch.setattr(HfApi, "dataset_info", unknown)
    with pytest.raises(DataError, match="not on the Hugging Face Hub"):
        load_examples("hf:someone/typo")
    assert len(offline_seen) == 1  # refused before `datasets` is asked


def test_saved_to_disk_dataset_folders(tmp_path):
    import datasets

    datasets.Dataset.from_list(CHAT_ROWS).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(CHAT_ROWS),
                          "test": datasets.Dataset.from_list(CHAT_ROWS[:1])}).save_to_disk(str(tmp_path / "both"))
    datasets.DatasetDict({"sft": datasets.Dataset.from_list(CHAT_ROWS)}).save_to_disk(str(tmp_path / "sft_only"))
    assert len(load_examples(tmp_path / "one")) == 4
    assert len(load_examples(tmp_path / "both")) == 4  # the `train` split
    assert len(load_examples(tmp_path / "both" / "test")) == 1
    # Arrow gives every row every key: unset optional fields arrive as None and mean "absent"
    sparse = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "context", "weight": 0},
                            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a"}]}, CHAT_ROWS[0]]
    datasets.Dataset.from_list(sparse).save_to_disk(str(tmp_path / "sparse"))
    weighted, plain = load_examples(tmp_path / "sparse")
    assert [m.get("weight") for m in weighted.messages] == [None, 0, None, None]
    assert all("weight" not in m for m in plain.messages)
    with pytest.raises(DataError, match="splits sft and no `train`"):
        load_examples(tmp_path / "sft_only")


def test_recipe_keeps_hub_references_unresolved(tmp_path):
    from peftkit.config import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nmodel: {name: smollm2-135m-instruct}\nadapter: {method: lora}\n"
                      "data: {train: 'hf:HuggingFaceH4/no_robots:train', eval: local.jsonl}\n")
    data = load_recipe(recipe).data
    assert data.train == "hf:HuggingFaceH4/no_robots:train"
    assert data.eval == str((tmp_path / "local.jsonl").resolve())


def test_several_training_sources_are_concatenated(tmp_path, tiny_tokenizer):
    """`data.train` may list several sources (axolotl's `datasets:`), relative paths resolved each."""
    from peftkit.config import load_recipe
    from peftkit.data.build import build_datasets

    write_jsonl(tmp_path / "data" / "chat.jsonl", CHAT_ROWS)
    write_jsonl(tmp_path / "data" / "sharegpt.jsonl", [
        {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]} for i in range(3)])
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text("name: t\nmodel: {name: smollm2-135m-instruct}\nadapter: {method: lora}\n"
                           "data: {train: [data/chat.jsonl, data/sharegpt.jsonl, 'hf:OWNER/NAME'], eval: data/chat.jsonl}\n")
    data = load_recipe(recipe_path).data
    assert data.train == [str((tmp_path / "data" / "chat.jsonl").resolve()),
                          str((tmp_path / "data" / "sharegpt.jsonl").resolve()), "hf:OWNER/NAME"]
    examples = load_examples(data.train[:2])
    assert len(examples) == 7 and examples[4].where.endswith("sharegpt.jsonl:1")
    bundle = build_datasets(data.model_copy(update={"train": data.train[:2]}), tiny_tokenizer)
    assert bundle.stats["train_examples"] == 7 and len(bundle.eval) == 4

    (tmp_path / "data" / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl"):
        load_examples([data.train[0], str(tmp_path / "data" / "empty.jsonl")])
    from peftkit.config import recipe_from_dict
    from peftkit.errors import ConfigError

    with pytest.raises(ConfigError, match="data.train"):
        recipe_from_dict({"data": {"train": []}})


@pytest.mark.parametrize("name, body", [
    ("train.jsonl", json.dumps({"instruction": "q", "output": "a"}) + "\r\n"),
    ("train.json", json.dumps([{"instruction": "q", "output": "a"}])),
    ("train.csv", "instruction,input,output\r\nq,,a\r\n"),
])
def test_a_utf8_byte_order_mark_is_ignored(tmp_path, name, body):
    """Windows tools (Notepad, Excel's "CSV UTF-8") start files with a BOM; it is not part of the data."""
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    (example,) = load_examples(path)
    assert example.messages == ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})


def test_json_lines_named_json_are_read_as_json_lines(tmp_path):
    """`datasets`' `Dataset.to_json("train.json")` writes JSON Lines under a .json name."""
    path = tmp_path / "train.json"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(3)))
    assert [e.messages[0]["content"] for e in load_examples(path)] == ["q0", "q1", "q2"]
    path.write_text(json.dumps({"text": "ok"}) + "\n" + '{"text": \n')
    with pytest.raises(DataError, match=r"train.json:2: line is not valid JSON"):
        load_examples(path)


@pytest.mark.parametrize("name", ["train.tar.gz", "train.xlsx"])
def test_an_unsupported_file_type_is_named_not_parsed_as_json_lines(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x1f\x8b\x08\x00binary")
    with pytest.raises(DataError, match=rf"{name}: peftkit reads .jsonl, .json, .parquet, .csv, .tsv, .txt data files"):
        load_examples(path)


@pytest.mark.parametrize("record", [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]},
    {"prompt": "hi", "completion": ""},
    {"instruction": "hi", "input": "", "output": ""},
])
def test_an_empty_reply_is_refused_with_its_line(tmp_path, record):
    """An empty reply would train the model to end its turn at once; a context-only one (weight 0) is fine."""
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "fine"}, record])
    with pytest.raises(DataError, match=r"train.jsonl:2: .*empty"):
        load_examples(path)
    context = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "weight": 0},
                            {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}
    assert len(load_examples(write_jsonl(tmp_path / "ok.jsonl", [context]))) == 1


def test_an_export_of_a_template_without_system_messages_folds_its_default_into_the_first_user_turn(tiny_tokenizer):
    from peftkit.data.chat import generation_prompt
    from peftkit.models.load import set_default_system_prompt

    tokenizer = _with_template(tiny_tokenizer, MISTRAL_V01_TEMPLATE)
    trained = generation_prompt(tokenizer, [{"role": "system", "content": "be brief."}, TWO_TURNS[0]])
    assert set_default_system_prompt(tokenizer, "be brief.")
    # what a client that sends only the user turn gets is what training saw (no exception from the template)
    served = tokenizer.apply_chat_template([TWO_TURNS[0]], tokenize=False, add_generation_prompt=True)
    assert served == trained and "[INST] be brief.\n\nhello [/INST]" in served


def test_several_bad_records_are_listed_in_one_error(tmp_path):
    from peftkit.data.formats import MAX_REPORTED_PROBLEMS

    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    rows = [good, {"messages": [{"role": "user", "content": "a"}]}, {"messages": [{"role": "narrator", "content": "a"}]}]
    rows += [{"messages": [{"role": "user", "content": "a"}]}] * MAX_REPORTED_PROBLEMS
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as caught:
        load_examples(path)
    said = str(caught.value)
    assert said.startswith(f"{len(rows) - 1} records of {path} need fixing")
    assert f"{path}:2: the conversation has no assistant turn" in said and f"{path}:3: message 1 has unknown role 'narrator'" in said
    assert said.endswith("... and 2 more")


def test_a_conversation_whose_replies_are_all_context_says_so(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]}]
    with pytest.raises(DataError, match=r"no assistant turn to train on.*all have `weight: 0`"):
        load_examples(write_jsonl(tmp_path / "d.jsonl", rows))


def test_a_huge_record_is_tokenized_only_as_far_as_training_keeps_it(tiny_tokenizer):
    """A 50 MB message took minutes and gigabytes to tokenize whole; only its first max_seq_len tokens are kept,
    and they must be the same tokens (and labels) as the whole text's."""
    import random

    from peftkit.data.chat import tokenize_conversation

    words = ["library", "opens", "nine", "river", "password", "  ", "\n", "x" * 40, "42", "é"]
    rng = random.Random(0)
    long_reply = " ".join(rng.choice(words) for _ in range(40_000))
    messages = [{"role": "user", "content": "tell me everything"}, {"role": "assistant", "content": long_reply}]
    seen = []

    class Recording:
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __call__(self, text, **kwargs):
            seen.append(len(text))
            return self.tokenizer(text, **kwargs)

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

    for max_seq_len in (64, 300):
        whole, whole_cut = tokenize_conversation(tiny_tokenizer, messages, 10**9)
        seen.clear()
        row, cut = tokenize_conversation(Recording(tiny_tokenizer), messages, max_seq_len)
        assert cut and not whole_cut and max(seen) < len(long_reply) / 4
        assert row["input_ids"] == whole["input_ids"][:max_seq_len] and row["labels"] == whole["labels"][:max_seq_len]
    short, short_cut = tokenize_conversation(Recording(tiny_tokenizer), messages[:1] + [{"role": "assistant", "content": "hi"}], 64)
    assert not short_cut and short["input_ids"]


SPACE_ENDED_TEMPLATE = (  # Vicuna-style: the assistant header ends in a space that byte-level BPE joins to the reply
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}"
)


def test_a_generation_prompt_ending_in_a_space_trains_what_serving_feeds_the_model(tiny_tokenizer):
    """" Martha" starts on the header's space: it went untrained, and the model never saw the prompt as a served
    model does (tokenized alone, ending in a space token), so it answered nonsense after training."""
    from peftkit.data.chat import generation_prompt

    tokenizer = _with_template(tiny_tokenizer, SPACE_ENDED_TEMPLATE)
    row, _ = tokenize_conversation(tokenizer, TWO_TURNS, max_seq_len=512)
    assert supervised_text(tokenizer, row) == "hi there<|im_end|>goodbye<|im_end|>"
    for turn in (1, 3):  # each reply follows its prompt exactly as serving tokenizes that prompt
        prompt = tokenizer(generation_prompt(tokenizer, TWO_TURNS[:turn]), add_special_tokens=False)["input_ids"]
        assert row["input_ids"][: len(prompt)] == prompt
        assert row["labels"][len(prompt) - 1] == IGNORE_INDEX and row["labels"][len(prompt)] != IGNORE_INDEX


MISTRAL_V03_TEMPLATE = (  # Mistral-7B-Instruct v0.3: the system prompt goes into the conversation's LAST user message
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}{{ bos_token }}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
    "{% if loop.last and system_message is defined %}{{ '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + message['content'] | trim + eos_token }}{% endif %}{% endfor %}"
)


def test_a_template_that_places_the_system_prompt_in_the_last_user_turn_trains_each_turn_as_served(tiny_tokenizer,
                                                                                                    caplog):
    """Mistral v0.3 shows the system prompt only in a conversation's last user message: a multi-turn conversation
    with a system prompt was refused ("the generation prompt is not how it starts an assistant turn"), then trained
    per turn with a warning about templates that rewrite earlier replies."""
    from peftkit.data.chat import generation_prompt, tokenize_conversation_rows

    tokenizer = _with_template(tiny_tokenizer, MISTRAL_V03_TEMPLATE)
    messages = [{"role": "system", "content": "be brief."}, *TWO_TURNS]
    with caplog.at_level("WARNING", logger="peftkit.data"):
        rows, _ = tokenize_conversation_rows(tokenizer, messages, 512)
    assert "shows the system prompt in the conversation's last user message only" in caplog.text
    assert "<think>" not in caplog.text
    assert [supervised_text(tokenizer, row) for row in rows] == [" hi there<|im_end|>", " goodbye<|im_end|>"]
    for row, turn in zip(rows, (2, 4)):  # each reply after its prompt exactly as chat and eval send it
        served = generation_prompt(tokenizer, messages[:turn])
        assert served.count("be brief.") == 1
        assert tokenizer.decode(row["input_ids"]).startswith(served)


R1_TEMPLATE = (  # DeepSeek-R1 distills: every reply rendered without its <think> block
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|im_start|>user\\n' + message['content'] }}"
    "{% else %}{{ '<|im_start|>assistant\\n' + message['content'].split('</think>')[-1] + '<|im_end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_template_that_leaves_part_of_a_reply_out_is_named_not_trained_silently(tiny_tokenizer):
    """The reasoning of an R1-style reply vanished from training; a template that only re-wraps the <think> block in
    its own newlines (Qwen3) keeps every word and is accepted."""
    reply = "<think>two and two</think>the answer is four."
    messages = [{"role": "user", "content": "two and two?"}, {"role": "assistant", "content": reply}]
    with pytest.raises(DataError, match=r"chat.jsonl:3: the chat template leaves part of reply 2's text out "
                                        r"\('<think>two and two</think>the answer is four.' is rendered as "
                                        r"'the answer is four.<\|im_end\|>'\).*model.chat_template"):
        tokenize_conversation(_with_template(tiny_tokenizer, R1_TEMPLATE), messages, 512, where="chat.jsonl:3")
    rewrapping = R1_TEMPLATE.replace(
        "message['content'].split('</think>')[-1]",
        "'<think>\\n' + message['content'].split('</think>')[0].split('<think>')[-1] + '\\n</think>\\n\\n'"
        " + message['content'].split('</think>')[-1]")
    row, _ = tokenize_conversation(_with_template(tiny_tokenizer, rewrapping), messages, 512)
    assert supervised_text(tiny_tokenizer, row) == "<think>\ntwo and two\n</think>\n\nthe answer is four.<|im_end|>"

BLANK_LINE_TEMPLATE = (  # Llama-3-style headers: the generation prompt ends in a blank line ("\n\n")
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n\n' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n\n' }}{% endif %}"
)

CHATML_NEWLINE_ENDED = BLANK_LINE_TEMPLATE.replace("\n\n", "\n")


def test_a_prompt_the_tokenizer_encodes_otherwise_at_its_end_trains_what_serving_feeds_the_model():
    """GPT-2's pre-tokenizer makes "\n\n" one token at the end of a text and two before a word: tokenized whole, the
    rows taught replies after two newline tokens while chat and eval send the prompt ending in one; the tuned model
    answered from its second or third word on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from peftkit.data.chat import generation_prompt
    from tests.conftest import CORPUS

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    backend.train_from_iterator([*CORPUS, "hello\n\nworld\n\n" * 50] * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>")
    tokenizer.chat_template = BLANK_LINE_TEMPLATE
    prompt = generation_prompt(tokenizer, TWO_TURNS[:1])
    assert tokenizer(prompt, add_special_tokens=False)["input_ids"] != \
        tokenizer(prompt + "hi", add_special_tokens=False)["input_ids"][:-1]  # the case: the last tokens differ
    row, _ = tokenize_conversation(tokenizer, TWO_TURNS, max_seq_len=512)
    assert supervised_text(tokenizer, row) == "hi there<|im_end|>goodbye<|im_end|>"
    labels = row["labels"]
    starts = [i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX]
    header = len(tokenizer("<|im_start|>assistant\n\n", add_special_tokens=False)["input_ids"])
    for turn, start in zip((1, 3), starts):  # each reply follows the generation prompt's tokens as served
        served = tokenizer(generation_prompt(tokenizer, TWO_TURNS[:turn]), add_special_tokens=False)["input_ids"]
        assert row["input_ids"][start - header : start] == served[-header:]
    first = tokenizer(generation_prompt(tokenizer, TWO_TURNS[:1]), add_special_tokens=False)["input_ids"]
    assert row["input_ids"][: starts[0]] == first
    plain = _with_template(tokenizer, CHATML_NEWLINE_ENDED)  # a prompt whose tokens do not change: encoded whole
    whole = tokenizer(plain.apply_chat_template(TWO_TURNS, tokenize=False), add_special_tokens=False)["input_ids"]
    assert tokenize_conversation(plain, TWO_TURNS, max_seq_len=512)[0]["input_ids"] == whole


def test_a_space_ended_prompt_that_the_tokenizer_cannot_cut_cleanly_is_named(tmp_path, caplog):
    """A sentencepiece tokenizer puts a space before each piece it encodes, so the cut would add a space: the
    conversation is encoded whole, as before, and the template fix is named."""
    from tests.unit.export_fixtures import build_sentencepiece_tokenizer

    tokenizer = build_sentencepiece_tokenizer(tmp_path / "sp")
    tokenizer.chat_template = SPACE_ENDED_TEMPLATE.replace("<|im_end|>", "</s>")
    row, _ = tokenize_conversation(tokenizer, TWO_TURNS, max_seq_len=512)
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)
    assert "remove the whitespace at the end of the template's assistant header" in caplog.text


def test_special_token_text_written_in_the_data_is_named(tiny_tokenizer, caplog):
    """`<|im_end|>` written in a reply is read as the end-of-turn token itself: the reply would teach the model to
    stop halfway. It cannot be told apart after tokenizing, so it is named before training."""
    from peftkit.data.build import tokenize_examples
    from peftkit.data.formats import Example

    written = [{"role": "user", "content": "what ends a turn?"},
               {"role": "assistant", "content": "the marker <|im_end|> ends a turn."}]
    plain = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    tokenize_examples([Example(messages=tuple(plain), where="t.jsonl:1")], tiny_tokenizer, 128, None)
    assert "special tokens" not in caplog.text
    tokenize_examples([Example(messages=tuple(plain), where="t.jsonl:1"), Example(messages=tuple(written), where="t.jsonl:2")],
                      tiny_tokenizer, 128, None, what="training example")
    assert "the training examples contain the text of special tokens" in caplog.text
    assert "'<|im_end|>' (t.jsonl:2)" in caplog.text


def test_an_end_of_turn_token_not_marked_special_is_named_too(tiny_tokenizer, caplog):
    """`<|eot|>` added with special=False and closing each reply: written in a reply it is still read as the token,
    and the model learns to stop there; only special tokens were looked for."""
    import copy

    from tokenizers import AddedToken

    from peftkit.data.build import tokenize_examples
    from peftkit.data.formats import Example
    from tests.conftest import CHATML

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_tokens([AddedToken("<|eot|>", special=False)])
    tokenizer.chat_template = CHATML.replace("<|im_end|>", "<|eot|>")
    written = [{"role": "user", "content": "what ends it?"}, {"role": "assistant", "content": "the <|eot|> ends it."}]
    tokenize_examples([Example(messages=tuple(written), where="t.jsonl:1")], tokenizer, 128, None,
                      what="training example")
    assert "'<|eot|>' (t.jsonl:1)" in caplog.text


def test_a_blank_system_turn_counts_as_none(tiny_tokenizer):
    """ShareGPT exports often carry `{"from": "system", "value": ""}`: it was trained as an empty system turn
    while chat, eval and held-out questions used the recipe's system prompt."""
    from peftkit.data.chat import with_system_prompt

    blank = [{"role": "system", "content": "  "}, {"role": "user", "content": "hello"}]
    assert with_system_prompt(blank, "you are the desk bot.")[0] == {"role": "system", "content": "you are the desk bot."}
    assert with_system_prompt(blank, None) == blank[1:]
    own = [{"role": "system", "content": "you are bob."}, *blank[1:]]
    assert with_system_prompt(own, "you are the desk bot.") == own


@pytest.mark.parametrize("record", [
    {"system": "be brief.", "prompt": "hello", "completion": "hi"},
    {"system_prompt": "be brief.", "instruction": "hello", "input": "", "output": "hi"},
    {"system": "be brief.", "instruction": "hello", "output": "hi", "history": [["hey", "hi"]]},
    {"system": "be brief.", "conversations": [{"from": "system", "value": ""}, {"from": "human", "value": "hello"},
                                              {"from": "gpt", "value": "hi"}]},
    {"system_prompt": "be brief.", "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]},
])
def test_a_record_level_system_prompt_is_the_system_turn_in_every_format(tmp_path, record):
    """prompt/completion and alpaca records dropped their `system` / `system_prompt`; a blank system turn hid it."""
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert examples[0].messages[0] == {"role": "system", "content": "be brief."}
    assert [m["role"] for m in examples[0].messages].count("system") == 1


GPT_OSS_LIKE_TEMPLATE = (  # gpt-oss: the last reply ends with <|return|>, earlier ones with <|end|>
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|start|>user<|message|>' + m['content'] + '<|end|>' }}"
    "{% else %}{{ '<|start|>assistant<|message|>' + m['content'] }}{{ '<|return|>' if loop.last else '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|start|>assistant<|message|>' }}{% endif %}"
)
CLOSING_EOS_ONLY_TEMPLATE = (  # Alpaca style: no end token per reply, EOS closes the conversation
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Response:\\n' + m['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@pytest.mark.parametrize(("template", "end"), [(GPT_OSS_LIKE_TEMPLATE, "<|return|>"), (CLOSING_EOS_ONLY_TEMPLATE, "<|im_end|>")])
def test_a_reply_whose_only_end_token_closes_the_conversation_keeps_it(tiny_tokenizer, template, end):
    """Trimming Phi-3's conversation-closing EOS must not take a reply's only end token: gpt-oss's <|return|> and an
    Alpaca-style closing EOS were cut, and the model would never learn to stop."""
    from peftkit.data.chat import end_of_turn_token_id, reply_end_problem

    tokenizer = _with_template(tiny_tokenizer, template)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start|>", "<|message|>", "<|end|>", "<|return|>"]})
    row, _ = tokenize_conversation(tokenizer, TWO_TURNS[:2], max_seq_len=512)
    assert supervised_text(tokenizer, row).startswith("hi there") and supervised_text(tokenizer, row).endswith(end)
    assert end_of_turn_token_id(tokenizer) == tokenizer.convert_tokens_to_ids(end)
    assert reply_end_problem(tokenizer) is None


def test_the_end_of_turn_probe_follows_a_tokenizer_whose_template_or_vocabulary_changes(tiny_tokenizer):
    """The probe is cached per tokenizer; the same object with another template, or with tokens added, is probed
    again rather than answered from the cache."""
    from peftkit.data.chat import _reply_end_marker, end_of_turn_token_id

    tokenizer = copy.deepcopy(tiny_tokenizer)
    assert _reply_end_marker(tokenizer).startswith("<|im_end|>")
    tokenizer.chat_template = GPT_OSS_LIKE_TEMPLATE
    assert _reply_end_marker(tokenizer).startswith("<|return|>")
    assert end_of_turn_token_id(tokenizer) is None  # <|return|> is not a token of this vocabulary yet
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start|>", "<|message|>", "<|end|>", "<|return|>"]})
    assert end_of_turn_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|return|>")

def _pairs(tmp_path, name, questions):
    return write_jsonl(tmp_path / name, [{"question": q, "answer": f"answer to {q}"} for q in questions])


def _question(example) -> str:
    return example.messages[0]["content"]


def test_copies_of_a_record_stay_on_one_side_of_the_split(tmp_path):
    """An eval row that training also has measures memorisation: copies are split as one group."""
    import random

    distinct = load_examples(_pairs(tmp_path, "d.jsonl", [f"q{i}" for i in range(20)]))
    order = list(range(20))
    random.Random(7).shuffle(order)
    train, held_out = split_train_eval(distinct, 0.2, seed=7)
    assert [e.where for e in held_out] == [distinct[i].where for i in sorted(order[:4])], "no copies: the plain split"
    examples = load_examples(_pairs(tmp_path, "c.jsonl", ["a", "b", "c"] * 10 + [f"q{i}" for i in range(10)]))
    for seed in range(5):
        train, held_out = split_train_eval(examples, 0.2, seed=seed)
        assert len(held_out) == 8 and len(train) == 32
        assert not {_question(e) for e in held_out} & {_question(e) for e in train}
        assert [e.where for e in held_out] == [e.where for e in split_train_eval(examples, 0.2, seed=seed)[1]]
    train, held_out = split_train_eval(load_examples(_pairs(tmp_path, "x.jsonl", ["a", "b", "c", "d"] * 10)), 0.2, seed=0)
    assert len(held_out) == 10 and len({_question(e) for e in held_out}) == 1, "every group too big: the smallest one"
    assert not {_question(e) for e in held_out} & {_question(e) for e in train}
    two = load_examples(_pairs(tmp_path, "y.jsonl", ["a", "b"] * 50))
    train, held_out = split_train_eval(two, 0.05, seed=0)  # a whole group would be half the data: the plain split
    assert len(held_out) == 5 and len(train) == 95


def test_duplicates_and_eval_rows_seen_in_training_are_warned_about(tmp_path, caplog):
    import logging

    from peftkit.config.schema import DataConfig
    from peftkit.data.build import train_eval_examples

    train_file = _pairs(tmp_path, "t.jsonl", ["a", "b", "a", "c", "a", "d", "e", "f"])
    eval_file = _pairs(tmp_path, "e.jsonl", ["b", "z"])
    with caplog.at_level(logging.WARNING, logger="peftkit.data.build"):
        train_eval_examples(DataConfig(train=str(train_file), eval=str(eval_file)), seed=0)
        train_eval_examples(DataConfig(train=str(train_file), eval=str(eval_file)), seed=0)
    assert caplog.text.count(f"training examples that repeat an earlier one exactly: 2 of 8 (first: {train_file}:3 "
                             f"repeats {train_file}:1)") == 1, "warned once"
    assert caplog.text.count(f"eval examples that also occur in the training data: 1 of 2 (first: {eval_file}:1)") == 1
    caplog.clear()
    other = _pairs(tmp_path, "o.jsonl", ["a", "b", "a", "c", "a", "d", "e", "f"])
    with caplog.at_level(logging.WARNING, logger="peftkit.data.build"):
        train, held_out = train_eval_examples(DataConfig(train=str(other), eval_fraction=0.25), seed=0)
    assert "repeat an earlier one exactly: 2 of 8" in caplog.text and "also occur in the training" not in caplog.text
    assert len(held_out) == 2
    caplog.clear()
    copies = _pairs(tmp_path, "k.jsonl", ["a", "b", "c"] * 4)  # every record 4 times; the split holds 1
    with caplog.at_level(logging.WARNING, logger="peftkit.data.build"):
        train, held_out = train_eval_examples(DataConfig(train=str(copies), eval_fraction=0.1), seed=0)
    assert len(held_out) == 1 and "eval split examples that also occur in the training data: 1 of 1" in caplog.text
    assert "raise data.eval_fraction" in caplog.text and "remove them from one of the two" not in caplog.text


def test_the_eval_split_is_limited_by_max_eval_examples_and_a_large_one_is_warned(tmp_path, tiny_recipe, caplog,
                                                                                  monkeypatch):
    from peftkit.config import recipe_from_dict
    from peftkit.data import build
    from peftkit.data.build import train_eval_examples

    monkeypatch.setattr(build, "LARGE_EVAL_SPLIT", 50)
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(300)]
    (tmp_path / "big.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = {**tiny_recipe["data"], "train": str(tmp_path / "big.jsonl"), "eval_fraction": 0.2}
    limited = recipe_from_dict({**tiny_recipe, "data": {**data, "max_eval_examples": 25}})
    with caplog.at_level(logging.INFO, logger="peftkit.data"):
        train, held_out = train_eval_examples(limited.data, seed=1)
    assert (len(train), len(held_out)) == (275, 25)
    assert "The eval split holds 25 of the 300 examples (data.max_eval_examples" in caplog.text
    assert "set data.max_eval_examples" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="peftkit.data"):
        _, whole = train_eval_examples(recipe_from_dict({**tiny_recipe, "data": data}).data, 1)  # the default: no limit
    assert len(whole) == 60
    assert "The eval split holds 60 examples (data.eval_fraction 0.2 of 300)" in caplog.text
    assert {e.where for e in held_out} <= {e.where for e in whole}  # the same shuffled order, cut shorter


def test_plain_text_gets_one_eos_when_the_tokenizer_adds_eos_itself():
    from peftkit.data.chat import tokenize_text_rows

    class EndsWithEos:
        eos_token_id = 2

        def __call__(self, text, add_special_tokens=True, verbose=False):
            return {"input_ids": [1, *range(10, 10 + len(text.split())), 2] if add_special_tokens else []}

    rows = tokenize_text_rows(EndsWithEos(), "the library opens at nine", max_seq_len=64)
    assert rows[0]["input_ids"] == [1, 10, 11, 12, 13, 14, 2]

    class NoEos(EndsWithEos):
        def __call__(self, text, add_special_tokens=True, verbose=False):
            return {"input_ids": [1, 10, 11]}

    assert tokenize_text_rows(NoEos(), "two words", max_seq_len=64)[0]["input_ids"] == [1, 10, 11, 2]


def test_a_system_prompt_on_plain_text_data_is_warned_about(tmp_path, caplog):
    import logging

    from peftkit.config.schema import DataConfig
    from peftkit.data.build import train_eval_examples

    (tmp_path / "corpus.txt").write_text("The library opens at nine.\n\nIt closes at six.\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="peftkit.data.build"):
        train_eval_examples(DataConfig(train=str(tmp_path / "corpus.txt"), system_prompt="You are a librarian."), 42)
    assert "data.system_prompt (You are a librarian.) is not trained: the training data is plain text" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="peftkit.data.build"):
        train_eval_examples(DataConfig(train=str(tmp_path / "corpus.txt")), 42)
    assert "system_prompt" not in caplog.text


@pytest.mark.parametrize(("systems", "warned"), [(["Own.", "Own."], True), (["Own.", None], False),
                                                 (["Own.", "   "], False), (["Recipe's.", "Own."], False)])
def test_a_system_prompt_no_conversation_trains_with_is_warned_about(tmp_path, caplog, systems, warned):
    import logging

    from peftkit.config.schema import DataConfig
    from peftkit.data.build import train_eval_examples

    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": ([{"role": "system", "content": text}] if text is not None else []) + turns} for text in systems])
    from peftkit.utils import once

    once._SAID.clear()  # said once per process
    with caplog.at_level(logging.WARNING, logger="peftkit.data.build"):
        train_eval_examples(DataConfig(train=str(path), system_prompt="Recipe's.", eval_fraction=0), 42)
    said = "data.system_prompt (Recipe's.) is not trained: every training conversation has a system turn of its own"
    assert (said in caplog.text) is warned


def test_a_tokenizer_without_eos_or_template_trains_plain_text_and_names_the_fix_for_conversations():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from peftkit.data.chat import render_chat, tokenize_text_rows
    from peftkit.errors import PeftkitError
    from peftkit.models.load import apply_chat_template_setting

    words = ["<unk>", "the", "library", "opens", "at", "nine", "hi"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert tokenizer.eos_token is None and not tokenizer.chat_template
    apply_chat_template_setting(tokenizer, None)
    rows = tokenize_text_rows(tokenizer, "the library opens at nine", max_seq_len=64)
    assert rows and rows[0]["labels"] == rows[0]["input_ids"]
    with pytest.raises(PeftkitError, match=r"no end-of-sequence token.*set model\.chat_template to a template file"):
        render_chat(tokenizer, [{"role": "user", "content": "hi"}], generation=True)


def test_held_out_questions_without_a_chat_template_are_refused_before_the_model_loads(tiny_recipe, monkeypatch,
                                                                                      tmp_path, capsys):
    from peftkit.config import recipe_from_dict
    from peftkit.errors import PeftkitError
    from peftkit.models.load import NO_EOS_NO_TEMPLATE
    from peftkit.train import run as run_module

    original = run_module.load_tokenizer

    def without_template(*args, **kwargs):
        tokenizer = original(*args, **kwargs)
        tokenizer.chat_template, tokenizer.no_template_reason = None, NO_EOS_NO_TEMPLATE
        return tokenizer

    def model_loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run_module, "load_tokenizer", without_template)
    monkeypatch.setattr(run_module, "load_model", model_loaded)
    recipe = {**tiny_recipe, "eval": {**tiny_recipe["eval"], "sample_prompts": ["hi"]}}
    with pytest.raises(PeftkitError, match=r"^Invalid recipe: eval\.sample_prompts and data\.heldout ask the model as a chat, but the "
                                           r"tokenizer has no chat template.*or remove eval\.sample_prompts and data\.heldout"):
        run_module.train(recipe_from_dict(recipe))
    # validate says it too (it passed, and train then refused)
    import yaml

    import peftkit.models
    from peftkit.cli import main

    monkeypatch.setattr(peftkit.models, "load_tokenizer", without_template)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(path)]) == 2
    assert "eval.sample_prompts and data.heldout ask the model as a chat" in " ".join(capsys.readouterr().err.split())


def test_turn_keys_are_read_whatever_their_case_as_record_keys_are(tmp_path):
    """`{"MESSAGES": [{"Role": ..., "Content": ...}]}` was read down to the turns, which were then refused as having
    no `role` and `content`."""
    path = write_jsonl(tmp_path / "cased.jsonl", [
        {"MESSAGES": [{"Role": "User", "Content": "hi"}, {"Role": "Assistant", "Content": "Hello"}]},
        {"Conversations": [{"From": "human", "Value": "hi"}, {"From": "gpt", "Value": "Hello"}]}])
    for example in load_examples(path):
        assert [(m["role"], m["content"]) for m in example.messages] == [("user", "hi"), ("assistant", "Hello")]


def test_json_numbers_are_trained_as_written(tmp_path):
    """`"answer": 3.10` was trained as `3.1`, `12.50` as `12.5`; a whole number stays an integer (`4.0` -> `4`: pandas
    writes an integer column with a missing cell as floats)."""
    import copy
    import pickle

    from peftkit.data.columns import WrittenFloat

    path = tmp_path / "numbers.jsonl"
    path.write_text('{"question": "Which Python version?", "answer": 3.10}\n'
                    '{"question": "Price?", "answer": 12.50}\n{"question": "Small?", "answer": 2.5e-3}\n'
                    '{"messages": [{"role": "user", "content": "Fee?"}, {"role": "assistant", "content": 5.00}]}\n')
    assert [e.messages[-1]["content"] for e in load_examples(path)] == ["3.10", "12.50", "2.5e-3", "5"]
    number = WrittenFloat("3.10")
    assert number == 3.1 and copy.deepcopy(number) == 3.1 and pickle.loads(pickle.dumps(number)) == 3.1


def test_two_turns_of_one_speaker_and_a_late_system_message_say_how_to_fix_them(tmp_path):
    import json

    from peftkit.data.formats import load_examples
    from peftkit.errors import DataError

    path = tmp_path / "t.jsonl"
    for turns, fix in (([("user", "a"), ("user", "b"), ("assistant", "c")], "Two user turns in a row: merge them"),
                       ([("system", "a"), ("user", "b"), ("system", "c"), ("assistant", "d")], "merge its text into")):
        path.write_text(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n")
        with pytest.raises(DataError, match=fix):
            load_examples(path)


@pytest.mark.parametrize(("record", "said"), [
    ({"conversations": [{"from": "human", "valu": "hi"}, {"from": "gpt", "value": "x"}]},
     "conversation turn 1 must be an object with `from` and `value` (it has `valu`: did you mean `value`?)"),
    ({"messages": [{"role": "user", "contnet": "hi"}, {"role": "assistant", "content": "x"}]},
     "message 1 must be an object with `role` and `content` (it has `contnet`: did you mean `content`?)"),
])
def test_a_misspelt_turn_key_is_named(tmp_path, record, said):
    path = write_jsonl(tmp_path / "slip.jsonl", [record])
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert said in str(info.value)


def test_training_records_given_as_held_out_are_one_reason_whatever_their_keys(tmp_path):
    """Records with and without a `system` key were five long messages and '... and 5 more'."""
    turns = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    path = write_jsonl(tmp_path / "h.jsonl", [{"conversations": turns}] * 5 + [{"conversations": turns, "system": "s"}] * 5)
    with pytest.raises(DataError) as info:
        load_heldout(path, None)
    said = str(info.value)
    assert said.startswith(f"all 10 records of {path} (first: {path}:1): held-out records need `question`"), said
    assert said.count("training record") == 1 and "more" not in said


def test_lines_that_are_not_json_and_other_records_problems_are_said_together(tmp_path):
    """A broken line hid the wrong speaker of a later record until it was fixed: one round of fixes clears both."""
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    misspoken = {"conversations": [{"from": "humna", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([json.dumps(good), json.dumps(good)[:-4], json.dumps(misspoken), json.dumps(good)]) + "\n")
    with pytest.raises(DataError) as info:
        load_examples(path)
    first, second = str(info.value).splitlines()
    assert first.startswith(f"{path}:2: line is not valid JSON") and second.startswith(f"{path}:3: conversation turn 1 is "
                                                                                       "from 'humna' (did you mean")
