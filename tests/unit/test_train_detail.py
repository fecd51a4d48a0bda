"""axolotl's per-message `train_detail`: character ranges of a reply trained or masked, checked token by token."""

from __future__ import annotations

import copy
import json

import pytest

from peftkit.config.schema import ColumnsConfig
from peftkit.data import IGNORE_INDEX, load_examples, tokenize_conversation
from peftkit.data.chat import tokenize_conversation_rows
from peftkit.data.formats import check_messages
from peftkit.errors import DataError
from tests.conftest import write_jsonl

REPLY = "the library opens at nine and closes at five"
# tokens of REPLY under the tiny tokenizer, with their character offsets (checked in the first test):
# the 0-3 | library 3-11 | opens 11-17 | at 17-20 | nine 20-25 | and 25-29 | clo 29-33 | ses 33-36 | at 36-39 | five 39-44
REPLY_TOKENS = ["the", " library", " opens", " at", " nine", " and", " clo", "ses", " at", " five"]
QUESTION = {"role": "user", "content": "when does the library open?"}


def detail(*ranges: tuple[int, int, bool]) -> list[dict]:
    return [{"begin_offset": begin, "end_offset": end, "train": train} for begin, end, train in ranges]


def conversation(train_detail=None, **extra) -> list[dict]:
    reply = {"role": "assistant", "content": REPLY, **extra}
    if train_detail is not None:
        reply["train_detail"] = train_detail
    return [QUESTION, reply]


def tokenized(tokenizer, messages, where="d.jsonl:1"):
    row, truncated = tokenize_conversation(tokenizer, check_messages(messages, where), 512, where)
    assert not truncated
    return row


def trained_positions(row) -> list[int]:
    return [i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX]


def labels_at(row, positions) -> list[int]:
    return [token if i in positions else IGNORE_INDEX for i, token in enumerate(row["input_ids"])]


def test_reply_tokens_are_as_the_tests_assume(tiny_tokenizer):
    encoded = tiny_tokenizer(REPLY, add_special_tokens=False, return_offsets_mapping=True)
    assert [tiny_tokenizer.decode([t]) for t in encoded["input_ids"]] == REPLY_TOKENS
    assert [start for start, _ in encoded["offset_mapping"]] == [0, 3, 11, 17, 20, 25, 29, 33, 36, 39]
    plain = tokenized(tiny_tokenizer, conversation())
    reply = trained_positions(plain)
    assert [tiny_tokenizer.decode([plain["input_ids"][i]]) for i in reply] == [*REPLY_TOKENS, "<|im_end|>"]


@pytest.mark.parametrize(("ranges", "kept"), [
    # the middle masked (" and closes"): end_offset is inclusive, as in axolotl's docs (0..8 is "I'm doing")
    (((0, 24, True), (25, 35, False), (36, 43, True)), [0, 1, 2, 3, 4, 8, 9]),
    # the tail masked: the end-of-turn token is still trained, as axolotl's default `train_on_eos: turn` does
    (((0, 24, True), (25, 43, False)), [0, 1, 2, 3, 4]),
    # text no entry covers is not trained either
    (((0, 24, True),), [0, 1, 2, 3, 4]),
    # the head masked, and an entry that starts inside a word: a token is trained when its first character is
    (((0, 32, False), (33, 43, True)), [7, 8, 9]),
    # overlapping entries: trained wins, as in axolotl
    (((0, 43, False), (3, 10, True)), [1]),
])
def test_train_detail_trains_exactly_the_marked_tokens_and_the_end_of_turn(tiny_tokenizer, ranges, kept):
    plain = tokenized(tiny_tokenizer, conversation())
    row = tokenized(tiny_tokenizer, conversation(detail(*ranges)))
    assert row["input_ids"] == plain["input_ids"], "masking must not change how the text is tokenized"
    reply = trained_positions(plain)  # the reply's tokens, then its <|im_end|>
    assert row["labels"] == labels_at(row, {*(reply[k] for k in kept), reply[-1]})
    trained = [tiny_tokenizer.decode([row["input_ids"][i]]) for i in trained_positions(row)]
    assert trained == [*(REPLY_TOKENS[k] for k in kept), "<|im_end|>"]


def test_a_reply_whose_train_detail_trains_nothing_is_context_as_with_weight_0(tiny_tokenizer):
    masked = detail((0, 43, False))
    second = [*conversation(masked), {"role": "user", "content": "and on weekends?"},
              {"role": "assistant", "content": "it opens at nine."}]
    checked = check_messages(second, "d.jsonl:1")
    assert checked[1].get("weight") == 0 and "train_detail" not in checked[1]
    as_weight_0 = copy.deepcopy(second)
    del as_weight_0[1]["train_detail"]
    as_weight_0[1]["weight"] = 0
    assert tokenized(tiny_tokenizer, second) == tokenized(tiny_tokenizer, as_weight_0)
    for nothing in (masked, []):  # an empty list trains nothing too (axolotl: `bool(train_detail)` is false)
        with pytest.raises(DataError, match=r"d\.jsonl:1: the conversation has no assistant turn to train on.*"
                                            r"`train_detail` that trains none of their text"):
            check_messages(conversation(nothing), "d.jsonl:1")


def test_training_false_wins_over_train_detail(tiny_tokenizer):
    [_, reply, *_] = check_messages([*conversation(detail((0, 43, True)), training=False),
                                     {"role": "user", "content": "ok"}, {"role": "assistant", "content": "yes"}], "d:1")
    assert reply.get("weight") == 0 and "train_detail" not in reply


def test_without_train_detail_rows_are_byte_identical(tiny_tokenizer):
    plain = conversation()
    as_none = conversation(None)
    as_none[1]["train_detail"] = None  # an Arrow/Parquet column this message leaves unset
    whole = conversation(detail((0, len(REPLY) - 1, True)))  # every character trained: as without it
    assert check_messages(as_none, "d:1") == check_messages(plain, "d:1")
    expected = tokenized(tiny_tokenizer, plain)
    assert json.dumps(tokenized(tiny_tokenizer, as_none)) == json.dumps(expected)
    assert json.dumps(tokenized(tiny_tokenizer, whole)) == json.dumps(expected)


@pytest.mark.parametrize(("ranges", "said"), [
    (((0, 44, True),), r"entry 1: offsets 0\.\.44 are not within the content \(44 characters, so 0\.\.43 at most; "
                       r"end_offset is inclusive"),
    (((0, 10, True), (-1, 3, False)), r"entry 2: offsets -1\.\.3 are not within the content"),
    (((9, 3, True),), r"entry 1: offsets 9\.\.3 are not within the content .*not below begin_offset\); correct the"),
])
def test_offsets_out_of_range_are_refused_with_the_message_position(ranges, said):
    with pytest.raises(DataError, match=r"d\.jsonl:4: message 2: `train_detail` " + said):
        check_messages(conversation(detail(*ranges)), "d.jsonl:4")


@pytest.mark.parametrize(("value", "said"), [
    ("0-10", r"`train_detail` is a string; write it as a list of \{\"begin_offset\": int"),
    ([[0, 10, True]], r"`train_detail` entry 1 is a list, not an object"),
    ([{"begin_offset": "0", "end_offset": 10, "train": True}], r"`train_detail` entry 1: `begin_offset` must be a whole number, not '0'"),
    ([{"begin_offset": 0, "end_offset": 10.0, "train": True}], r"`train_detail` entry 1: `end_offset` must be a whole number, not 10\.0"),
    ([{"begin_offset": 0, "end_offset": 10}], r"`train_detail` entry 1: `train` must be true or false, not None"),
    ([{"begin_offset": 0, "end_offset": 10, "train": "yes"}], r"`train_detail` entry 1: `train` must be true or false, not 'yes'"),
    ([{"begin_offset": True, "end_offset": 10, "train": True}], r"`train_detail` entry 1: `begin_offset` must be a whole number"),
])
def test_malformed_train_detail_is_refused_with_how_to_write_it(value, said):
    with pytest.raises(DataError, match=r"d\.jsonl:2: message 2: " + said):
        check_messages(conversation(value), "d.jsonl:2")


def test_train_detail_on_a_prompt_turn_may_only_mask_it():
    trains = [{**QUESTION, "train_detail": detail((0, 3, True))}, {"role": "assistant", "content": REPLY}]
    with pytest.raises(DataError, match=r"message 1: `train_detail` marks part of a user message as trained, which is "
                                        r"not supported.*data\.train_on_prompt: true"):
        check_messages(trains, "d:1")
    masks = [{**QUESTION, "train_detail": detail((0, 3, False))}, {"role": "assistant", "content": REPLY}]
    assert check_messages(masks, "d:1") == check_messages([QUESTION, masks[1]], "d:1")  # never trained anyway


TRIMMING_TEMPLATE = (  # Llama 3 / Gemma style: replies rendered trimmed
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NEWLINES_TO_SPACES_TEMPLATE = TRIMMING_TEMPLATE.replace("message['content'] | trim", "message['content'] | replace('\n', ' ')")


def _with_template(tokenizer, template: str):
    changed = copy.deepcopy(tokenizer)
    changed.chat_template = template
    return changed


def test_offsets_follow_a_reply_the_template_trims(tiny_tokenizer):
    tokenizer = _with_template(tiny_tokenizer, TRIMMING_TEMPLATE)
    padded = [QUESTION, {"role": "assistant", "content": "  " + REPLY + "\n",
                         "train_detail": detail((0, 26, True), (27, 46, False))}]  # "  the ... nine" trained
    row = tokenized(tokenizer, padded)
    trained = [tokenizer.decode([row["input_ids"][i]]) for i in trained_positions(row)]
    assert trained == [*REPLY_TOKENS[:5], "<|im_end|>"]


def test_a_template_that_changes_the_reply_text_is_refused(tiny_tokenizer):
    tokenizer = _with_template(tiny_tokenizer, NEWLINES_TO_SPACES_TEMPLATE)
    multiline = [QUESTION, {"role": "assistant", "content": "the library\nopens at nine",
                            "train_detail": detail((0, 10, True))}]
    with pytest.raises(DataError, match=r"d\.jsonl:1: reply 2 has a `train_detail`, but the chat template changes the "
                                        r"reply's text .*so its character offsets cannot be applied"):
        tokenized(tokenizer, multiline)
    del multiline[1]["train_detail"]
    assert trained_positions(tokenized(tokenizer, multiline))  # without it the reply trains as before


THINKING_TEMPLATE = (  # Qwen3-like: only the last assistant turn carries an (empty) <think> block (history rewritten)
    "{# not test_data.py's template: its once-per-template warning stays unsaid for that test #}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' and loop.last %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_rows_of_a_template_that_rewrites_history_apply_train_detail(tiny_tokenizer):
    tokenizer = _with_template(tiny_tokenizer, THINKING_TEMPLATE)
    messages = check_messages([*conversation(detail((0, 24, True), (25, 43, False))),
                               {"role": "user", "content": "and the wifi?"},
                               {"role": "assistant", "content": "the wifi password is river",
                                "train_detail": detail((0, 7, False), (8, 25, True))}], "d:1")
    rows, truncated = tokenize_conversation_rows(tokenizer, messages, 512, "d:1")
    assert truncated == 0 and len(rows) == 2
    first, second = ("".join(tokenizer.decode([row["input_ids"][i]]) for i in trained_positions(row)) for row in rows)
    assert first == "<think>\n\n</think>\n\nthe library opens at nine<|im_end|>"  # the template's own text is trained
    assert second == "<think>\n\n</think>\n\n password is river<|im_end|>"
    # train_on_prompt trains every token, the masked ones too (as it does `weight: 0` turns)
    everything, _ = tokenize_conversation_rows(tokenizer, messages, 512, "d:1", train_on_prompt=True)
    assert " and closes at five" in tokenizer.decode([t for t, label in zip(everything[0]["input_ids"],
                                                                             everything[0]["labels"]) if label != IGNORE_INDEX])


def test_train_detail_is_read_from_sharegpt_columns_and_arrow_rows(tiny_tokenizer, tmp_path):
    import datasets

    masked = detail((0, 24, True), (25, 43, False))
    sharegpt = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": [
        {"from": "human", "value": QUESTION["content"]}, {"from": "gpt", "value": REPLY, "train_detail": masked}]}])
    mapped = write_jsonl(tmp_path / "mapped.jsonl", [{"dialog": [
        {"speaker": "customer", "text": QUESTION["content"]},
        {"speaker": "agent", "text": REPLY, "train_detail": masked}]}])
    # Arrow gives every turn every key: unset, the column is None and means "absent"
    rows = [{"messages": conversation(masked)}, {"messages": conversation()}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    [from_sharegpt] = load_examples(sharegpt)
    [from_columns] = load_examples(mapped, columns=ColumnsConfig(messages="dialog", role="speaker", content="text",
                                                                 roles={"customer": "user", "agent": "assistant"}))
    detailed, plain = load_examples(tmp_path / "rows.parquet")
    expected = ((0, 25, True), (25, 44, False))
    for example in (from_sharegpt, from_columns, detailed):
        assert example.messages[1]["train_detail"] == expected, example.where
    assert all("train_detail" not in m for m in plain.messages)
    for example, messages in ((detailed, conversation(masked)), (plain, conversation())):
        assert tokenize_conversation(tiny_tokenizer, example.messages, 512)[0] == tokenized(tiny_tokenizer, messages)


def test_a_short_reply_is_located_before_the_end_of_turn_not_inside_the_templates_text(tiny_tokenizer):
    """The reply "in" also occurs in the template's `<think>`: its offsets must count from the reply itself."""
    tokenizer = _with_template(tiny_tokenizer, THINKING_TEMPLATE)
    messages = check_messages([QUESTION, {"role": "assistant", "content": "in",
                                          "train_detail": detail((0, 0, True), (1, 1, False))}], "d:1")
    rows, _ = tokenize_conversation_rows(tokenizer, messages, 512, "d:1")
    text = tokenizer.decode(rows[0]["input_ids"])
    trained_chars = "".join(tokenizer.decode([rows[0]["input_ids"][i]]) for i in trained_positions(rows[0]))
    assert "<think>" in text and "<th" not in trained_chars.replace("<think>", "")  # the template's text is whole
    assert trained_chars.endswith("<|im_end|>") and "in<|im_end|>" not in trained_chars  # the masked "n" is not


def test_a_reply_masked_in_the_middle_still_counts_when_a_later_one_is_cut_off(tiny_tokenizer, tmp_path):
    """Its two runs of trained tokens are one reply: the reply past the limit is still reported as lost."""
    from peftkit.data.build import tokenize_examples

    long_question = "what time does the library open " * 20
    messages = [QUESTION, {"role": "assistant", "content": REPLY, "train_detail": detail((0, 9, True), (26, 42, True))},
                {"role": "user", "content": long_question}, {"role": "assistant", "content": "it opens at nine."}]
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": messages}])
    rows, stats = tokenize_examples(load_examples(path), tiny_tokenizer, 48, None, what=None)
    trained = [i for i, label in enumerate(rows[0]["labels"]) if label != IGNORE_INDEX]
    runs = sum(1 for n, i in enumerate(trained) if n == 0 or trained[n - 1] != i - 1)
    assert runs >= 2  # the masked middle splits the first reply
    assert stats["truncated"] == 1 and stats["replies_lost"] == 1
