"""Tool-use conversations: assistant `tool_calls`, `tool` results and a record's `tools` schemas."""

from __future__ import annotations

import copy
import json

import pytest

from peftkit.config import recipe_from_dict
from peftkit.data import IGNORE_INDEX, load_examples
from peftkit.data.chat import tokenize_conversation
from peftkit.errors import ConfigError, DataError
from peftkit.models.load import CHATML_TEMPLATE
from peftkit.train.run import train
from tests.conftest import write_jsonl

TOOLS = [{"type": "function", "function": {"name": "find_book", "description": "Look a book up in the catalogue",
                                           "parameters": {"type": "object", "properties": {"title": {"type": "string"}}}}}]
CALL = {"type": "function", "function": {"name": "find_book", "arguments": '{"title": "the river"}'}}  # OpenAI: JSON text
CONVERSATION = {
    "tools": json.dumps(TOOLS),  # as Hub datasets often store it
    "messages": [
        {"role": "user", "content": "is the river on the shelf?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "name": "find_book", "content": '{"shelf": "B4", "available": true}'},
        {"role": "assistant", "content": "yes, the river is on shelf B4."},
    ],
}


@pytest.fixture
def tool_tokenizer(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _supervised(tokenizer, row) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX])


def test_tool_calls_are_normalised_to_the_form_chat_templates_read(tmp_path):
    (example,) = load_examples(write_jsonl(tmp_path / "tools.jsonl", [CONVERSATION]))
    assert example.tools == tuple(TOOLS)
    call = example.messages[1]
    assert call["content"] == "" and call["tool_calls"] == [
        {"type": "function", "function": {"name": "find_book", "arguments": {"title": "the river"}}}]
    assert example.messages[2] == {"role": "tool", "content": '{"shelf": "B4", "available": true}', "name": "find_book"}


def test_only_the_calls_and_replies_are_trained_not_the_schemas_or_tool_results(tmp_path, tool_tokenizer):
    (example,) = load_examples(write_jsonl(tmp_path / "tools.jsonl", [CONVERSATION]))
    row, _ = tokenize_conversation(tool_tokenizer, example.messages, 512, tools=example.tools)
    text = tool_tokenizer.decode(row["input_ids"])
    assert "Look a book up in the catalogue" in text and "<tool_response>" in text
    trained = _supervised(tool_tokenizer, row)
    assert trained == ('<tool_call>{"name": "find_book", "arguments": {"title": "the river"}}</tool_call><|im_end|>'
                       "yes, the river is on shelf B4.<|im_end|>")


def test_without_tools_the_built_in_chatml_renders_as_before(tiny_tokenizer, tool_tokenizer):
    conversation = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "hello"},
                    {"role": "assistant", "content": "hi there"}, {"role": "user", "content": "bye"}]
    for generation_prompt in (False, True):
        assert (tool_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
                == tiny_tokenizer.apply_chat_template(conversation, tokenize=False,
                                                      add_generation_prompt=generation_prompt))


def test_a_template_without_tool_support_is_refused_before_training(tmp_path, tiny_tokenizer):
    """The plain ChatML of the fixture renders a tool call as an empty reply: training on it would teach silence."""
    (example,) = load_examples(write_jsonl(tmp_path / "tools.jsonl", [CONVERSATION]))
    with pytest.raises(DataError, match="does not render tool use. Set `model.chat_template: chatml`"):
        tokenize_conversation(tiny_tokenizer, example.messages, 512, where="tools.jsonl:1", tools=example.tools)



def test_a_template_that_raises_on_the_tool_role_is_named_as_lacking_tool_support(tmp_path, tiny_tokenizer):
    """Gemma's templates raise "roles must alternate" on a `tool` turn: the advice was to reorder the roles."""
    strict = copy.deepcopy(tiny_tokenizer)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                            "{% endif %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}")
    (example,) = load_examples(write_jsonl(tmp_path / "tools.jsonl", [CONVERSATION]))
    with pytest.raises(DataError, match=r"tools.jsonl:1: the chat template refused this tool-use conversation: "
                                        r"Conversation roles must alternate.*fix the data; where it has no tool "
                                        r"support at all"):
        tokenize_conversation(strict, example.messages, 512, where="tools.jsonl:1", tools=example.tools)


@pytest.mark.parametrize("empty", [None, "", "  ", "[]", []])
def test_a_record_without_tools_may_leave_the_column_empty(tmp_path, empty):
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": empty}
    (example,) = load_examples(write_jsonl(tmp_path / "plain.jsonl", [record]))
    assert example.tools is None


def test_llama_factory_sharegpt_function_call_and_observation_turns(tmp_path, tool_tokenizer):
    record = {"conversations": [{"from": "human", "value": "is the river on the shelf?"},
                                {"from": "function_call", "value": '{"name": "find_book", "arguments": {"title": "the river"}}'},
                                {"from": "observation", "value": '{"shelf": "B4"}'},
                                {"from": "gpt", "value": "yes, on shelf B4."}],
              "tools": json.dumps([TOOLS[0]["function"]])}  # LLaMA-Factory: bare function objects, as JSON text
    (example,) = load_examples(write_jsonl(tmp_path / "sharegpt.jsonl", [record]))
    assert example.tools == ({"type": "function", "function": TOOLS[0]["function"]},)  # wrapped, as templates read it
    assert [m["role"] for m in example.messages] == ["user", "assistant", "tool", "assistant"]
    assert example.messages[1]["tool_calls"][0]["function"] == {"name": "find_book", "arguments": {"title": "the river"}}
    row, _ = tokenize_conversation(tool_tokenizer, example.messages, 512, tools=example.tools)
    assert _supervised(tool_tokenizer, row).startswith('<tool_call>{"name": "find_book"')


@pytest.mark.parametrize(("messages", "tools", "message"), [
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}, {"role": "assistant", "content": "c"}],
     None, "turn 2 is 'tool' but 'assistant' was expected"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
      {"role": "user", "content": "b"}], None, "turn 3 is 'user' but 'tool' was expected"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": [{"type": "function"}]}],
     None, "tool call 1 needs a function `name`"),
    ([{"role": "user", "content": "a"},
      {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}],
     None, "`arguments` is a string but not valid JSON"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "not json", "`tools` is a string but not valid JSON"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], [{"description": "x"}], "tool 1 in `tools` needs a `name`"),
    ([{"role": "user", "content": "a", "tool_calls": [CALL]}, {"role": "assistant", "content": "b"}], None,
     "only assistant messages make `tool_calls`"),
])
def test_malformed_tool_use_names_the_line_and_the_fix(tmp_path, messages, tools, message):
    record = {"messages": messages} | ({"tools": tools} if tools is not None else {})
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DataError, match=message) as info:
        load_examples(path)
    assert f"{path}:1" in str(info.value)


def test_a_recipe_trains_on_tool_use_with_the_built_in_chatml(tiny_recipe, tmp_path):
    short = {"tools": [{"name": "find_book"}],  # the tiny tokenizer spends a token on nearly every character
             "messages": [{"role": "user", "content": "the river?"},
                          {"role": "assistant", "content": "", "tool_calls": [{"name": "find_book", "arguments": {}}]},
                          {"role": "tool", "content": "B4"}, {"role": "assistant", "content": "shelf B4."}]}
    data = write_jsonl(tmp_path / "tools.jsonl", [short] * 8)
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"question": "the sea?", "tools": short["tools"], "key_fact": "find_book"}])
    base = {**tiny_recipe, "data": {**tiny_recipe["data"], "train": str(data), "heldout": str(heldout), "max_seq_len": 256},
            "train": {**tiny_recipe["train"], "max_steps": 2}, "eval": {"before": False}}
    with pytest.raises(ConfigError, match="model.chat_template: .*tools.jsonl:1: .*does not render tool use"):
        train(recipe_from_dict({**base, "output_dir": str(tmp_path / "refused")}))  # the fixture model's template
    assert not (tmp_path / "refused").exists()
    result = train(recipe_from_dict({**base, "model": {**base["model"], "chat_template": "chatml"}}))
    assert result.summary["trained_tokens"] > 0
    assert [s["prompt"] for s in result.summary["samples"]] == ["the sea?"], "held-out questions are the samples"
    assert "heldout_accuracy_after" in result.summary
    saved = json.loads((result.run_dir / "tokenizer" / "tokenizer_config.json").read_text()).get("chat_template") \
        or (result.run_dir / "tokenizer" / "chat_template.jinja").read_text()
    assert "<tool_call>" in saved, "the run keeps the template it was trained with"


def test_heldout_questions_can_offer_tools_and_are_asked_with_them(tmp_path, tool_tokenizer, tiny_model_dir):
    """A tool-use question: is the right function called? The key fact is the call's name."""
    from transformers import AutoModelForCausalLM

    from peftkit.data.build import load_heldout
    from peftkit.evaluate.generation import heldout_accuracy

    path = write_jsonl(tmp_path / "heldout.jsonl", [
        {"question": "is the river on the shelf?", "tools": TOOLS, "key_fact": "find_book"},
        {"question": "hello", "key_fact": "hello"},
        {"messages": CONVERSATION["messages"][:3], "tools": TOOLS, "key_fact": "B4"},  # answer from the tool result
    ])
    items = load_heldout(path, system_prompt="be brief.")
    assert items[0].tools == tuple(TOOLS) and items[1].tools is None
    rendered = []
    original = tool_tokenizer.apply_chat_template
    tool_tokenizer.apply_chat_template = lambda messages, **kw: rendered.append(original(messages, **kw)) or rendered[-1]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    _, details = heldout_accuracy(model, tool_tokenizer, items, max_new_tokens=2, batch_size=2)
    assert [d["question"] for d in details] == ["is the river on the shelf?", "hello", "is the river on the shelf?"]
    assert "<tools>" in rendered[0] and "find_book" in rendered[0] and "<tools>" not in rendered[1]
    assert rendered[2].endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert '<tool_call>{"name": "find_book", "arguments": {"title": "the river"}}</tool_call>' in rendered[2]


def test_the_tool_recipe_data_is_its_generators_output_and_holds_out_unseen_arguments():
    import random
    import runpy
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "recipes" / "data" / "bike-shop-tools"
    generator = runpy.run_path(str(folder / "make_data.py"))
    rng = random.Random(7)  # as make_data.main draws them
    train_rows, heldout_rows = generator["train_rows"](rng), generator["heldout_rows"](rng)
    read = [[json.loads(line) for line in (folder / name).read_text().splitlines()] for name in ("train.jsonl", "heldout.jsonl")]
    assert read == [train_rows, heldout_rows], "rerun recipes/data/bike-shop-tools/make_data.py"
    train_text = (folder / "train.jsonl").read_text()
    calls = [row["key_fact"] for row in heldout_rows if "arguments" in row["key_fact"]]
    assert len(calls) == 12
    for call in calls:  # the held-out arguments (order numbers, bike models, the weekday) never occur in training
        arguments = json.loads("{" + call.split('"arguments": {', 1)[1])
        unseen = {key: value for key, value in arguments.items() if key != "service"}  # 4 services, all trained
        assert not any(f'"{key}": {json.dumps(value)}' in train_text for key, value in unseen.items()), call


def test_a_template_that_shows_the_schemas_but_drops_the_calls_is_refused(tmp_path, tool_tokenizer):
    """The tool's name is in the system turn (its schema), yet the assistant's call renders as an empty reply."""
    drops_calls = CHATML_TEMPLATE.replace("message['tool_calls'] is defined and message['tool_calls']", "false")
    tool_tokenizer.chat_template = drops_calls
    (example,) = load_examples(write_jsonl(tmp_path / "tools.jsonl", [CONVERSATION]))
    with pytest.raises(DataError, match="leaves out the tool call 'find_book'"):
        tokenize_conversation(tool_tokenizer, example.messages, 512, where="tools.jsonl:1", tools=example.tools)


def test_a_template_that_wraps_tool_results_in_json_is_accepted(tmp_path, tool_tokenizer):
    """Mistral-style templates write the result JSON-escaped ({"content": "{\\"shelf\\": ...}"}): still rendered."""
    escaping = CHATML_TEMPLATE.replace("'<tool_response>\n' + message['content'] + '\n</tool_response>'",
                                       "'{\"content\": ' + (message['content'] | tojson) + '}'")
    assert escaping != CHATML_TEMPLATE
    tool_tokenizer.chat_template = escaping
    (example,) = load_examples(write_jsonl(tmp_path / "tools.jsonl", [CONVERSATION]))
    row, _ = tokenize_conversation(tool_tokenizer, example.messages, 512, tools=example.tools)
    assert '{"content": "{\\"shelf\\": \\"B4\\"' in tool_tokenizer.decode(row["input_ids"])


def test_a_thinking_template_that_rewrites_history_trains_tool_use_turn_by_turn(tiny_recipe, tmp_path):
    """Qwen3-style: only the last assistant turn carries its <think> block. The recipe check rendered the whole
    conversation once and refused it ("renders turn 2 differently"), although training gives each turn its own row."""
    from peftkit.config.validate import validate_recipe
    from peftkit.data.chat import tokenize_conversation_rows
    from peftkit.models import load_tokenizer

    thinking = CHATML_TEMPLATE.replace(
        "{% else %}{{ message['content'] or '' }}{% endif %}",
        "{% else %}{% if message['role'] == 'assistant' and loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}"
        "{% endif %}{{ message['content'] or '' }}{% endif %}")
    assert thinking != CHATML_TEMPLATE
    template = tmp_path / "thinking.jinja"
    template.write_text(thinking)
    data = write_jsonl(tmp_path / "tools.jsonl", [CONVERSATION] * 4)
    recipe = recipe_from_dict({**tiny_recipe, "model": {**tiny_recipe["model"], "chat_template": str(template)},
                               "data": {**tiny_recipe["data"], "train": str(data), "max_seq_len": 256}})
    validate_recipe(recipe)  # raised ConfigError: "model.chat_template: ...: the chat template renders turn 2 differently"
    (example,) = load_examples(write_jsonl(tmp_path / "one.jsonl", [CONVERSATION]))
    tokenizer = load_tokenizer(recipe.model)  # as training loads it
    rows, _ = tokenize_conversation_rows(tokenizer, example.messages, 4096, tools=example.tools)
    assert [_supervised(tokenizer, row).startswith("<think>") for row in rows] == [True, True]


def test_heldout_tool_questions_need_a_template_that_shows_the_tools(tiny_recipe, tmp_path):
    """Training data without tool use left the template unchecked: held-out tool questions were asked without their
    schemas and scored on calling them. `validate` (and so `train`) and `peftkit eval --heldout` refuse that."""
    from peftkit.config.validate import validate_recipe

    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"question": "the sea?", "tools": TOOLS, "key_fact": "find_book"}])
    recipe = {**tiny_recipe, "data": {**tiny_recipe["data"], "heldout": str(heldout)}}
    with pytest.raises(ConfigError, match=r"data.heldout: held-out questions come with `tools`, but the chat template "
                                          r"leaves the tool schemas out of the prompt \('find_book'"):
        validate_recipe(recipe_from_dict(recipe))
    validate_recipe(recipe_from_dict({**recipe, "model": {**recipe["model"], "chat_template": "chatml"}}))


def test_eval_refuses_heldout_tool_questions_its_template_cannot_show(tiny_recipe, tmp_path):
    from peftkit.evaluate.run_eval import evaluate_run

    run = train(recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 1},
                                  "eval": {"before": False}}))
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"question": "the sea?", "tools": TOOLS, "key_fact": "find_book"}])
    with pytest.raises(DataError, match=r"heldout.jsonl: held-out questions come with `tools`"):
        evaluate_run(run.run_dir, heldout=str(heldout))
    assert not (run.run_dir / "eval.json").exists()


def test_calls_to_tools_the_record_does_not_declare_are_warned_about(tmp_path, tiny_recipe, caplog):
    import logging

    from peftkit.config.validate import validate_recipe

    other = copy.deepcopy(CONVERSATION)
    other["messages"][1]["tool_calls"] = [{"type": "function", "function": {"name": "renew_loan", "arguments": "{}"}}]
    unlisted = {k: v for k, v in copy.deepcopy(CONVERSATION).items() if k != "tools"}
    path = write_jsonl(tmp_path / "tools.jsonl", [CONVERSATION, other, unlisted])
    recipe = recipe_from_dict({**tiny_recipe, "data": {**tiny_recipe["data"], "train": str(path)}})
    with caplog.at_level(logging.INFO, logger="peftkit"):
        validate_recipe(recipe, check_model=False)
    assert ("data.train: 1 conversation(s) call a tool their `tools` list does not declare (first: "
            f"{path}:2 calls renew_loan)") in caplog.text
    assert f"data.train: 1 conversation(s) make tool calls with no `tools` list (first: {path}:3)" in caplog.text



def test_tool_call_arguments_that_do_not_fit_the_declared_schema_are_warned_about(tmp_path, tiny_recipe, caplog):
    import logging

    from peftkit.config.validate import validate_recipe

    strict = copy.deepcopy(TOOLS)
    strict[0]["function"]["parameters"]["required"] = ["title"]
    typo = {**copy.deepcopy(CONVERSATION), "tools": strict}
    typo["messages"][1]["tool_calls"] = [{"type": "function", "function": {"name": "find_book",
                                                                           "arguments": {"titel": "the river"}}}]
    open_schema = copy.deepcopy(typo)
    open_schema["tools"][0]["function"]["parameters"].update(additionalProperties=True, required=[])
    path = write_jsonl(tmp_path / "tools.jsonl", [{**CONVERSATION, "tools": strict}, typo, open_schema])
    recipe = recipe_from_dict({**tiny_recipe, "data": {**tiny_recipe["data"], "train": str(path)}})
    with caplog.at_level(logging.INFO, logger="peftkit"):
        validate_recipe(recipe, check_model=False)
    assert ("data.train: 1 tool call(s) do not fit their tool's declared parameters (first: "
            f"{path}:2 calls find_book with `titel`, which the schema does not list; without required `title`)"
            ) in caplog.text
    from peftkit.config.validate import _arguments_problem

    odd = {"parameters": {"type": "object", "properties": {"a": {}}, "required": [{"a": 1}, 3, "a"]}}
    assert _arguments_problem({"a": 1}, odd) is None  # names that are not strings in `required` are no crash
    assert _arguments_problem({"b": 1}, {"parameters": {"properties": {}, "patternProperties": {"^b": {}}}}) is None
