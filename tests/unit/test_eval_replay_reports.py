"""Found by a new user's pass over evaluation and replay: replay paths, contrast rows, scoring, eval messages."""

from __future__ import annotations

import pytest
import yaml

from peftkit.config import load_recipe
from tests.conftest import write_jsonl

REPLAY_ROW = {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]}


def test_a_replay_file_is_found_next_to_the_recipe_not_in_the_current_directory(tiny_recipe, tmp_path, monkeypatch):
    """`replay.path: dd/x.jsonl` fell back to the current directory where the recipe's folder had no such file:
    the same recipe trained on another file, or failed, depending on where the command ran."""
    recipes, elsewhere = tmp_path / "recipes", tmp_path / "elsewhere"
    recipes.mkdir()
    write_jsonl(elsewhere / "dd" / "replay.jsonl", [REPLAY_ROW] * 4)
    recipe = {**tiny_recipe, "data": {**tiny_recipe["data"], "replay": {"path": "dd/replay.jsonl"}}}
    (recipes / "r.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(elsewhere)
    assert load_recipe(recipes / "r.yaml").data.replay.path == str(recipes / "dd" / "replay.jsonl")  # (missing)
    builtin = {**tiny_recipe, "data": {**tiny_recipe["data"], "replay": {"path": "builtin:general"}}}
    (recipes / "b.yaml").write_text(yaml.safe_dump(builtin))
    assert load_recipe(recipes / "b.yaml").data.replay.path == "builtin:general"
    # a command-line override is relative to the current directory, as the README says
    assert load_recipe(recipes / "r.yaml", ["data.replay.path=dd/replay.jsonl"]).data.replay.path == \
        str(elsewhere / "dd" / "replay.jsonl")


def test_known_only_filters_the_replay_answers_not_the_contrast_rows(tiny_recipe, tmp_path, monkeypatch):
    """Contrast rows are the base model's answers to the domain prompts, which differ from the domain's written answers
    by design: known_only dropped nearly all of them while summary and card counted every one."""
    import peftkit.evaluate.generation as generation
    from peftkit.config import recipe_from_dict
    from peftkit.data import build_datasets
    from peftkit.data.formats import Example
    from peftkit.data.replay import base_model_answerer
    from peftkit.errors import DataError
    from peftkit.models import load_tokenizer, resolve_model_ref

    def fake_generate_replies(model, tokenizer, conversations, **kwargs):
        return [generation.Reply("2 + 2 = 4." if "2 + 2" in str(c) else "I cannot say.", True) for c in conversations]

    monkeypatch.setattr(generation, "generate_replies", fake_generate_replies)
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"messages": [{"role": "user", "content": f"fee {i}?"}, {"role": "assistant", "content": f"The fee is ${i + 3}."}]}
        for i in range(4)])
    general = write_jsonl(tmp_path / "general.jsonl", [REPLAY_ROW])
    recipe = recipe_from_dict({**tiny_recipe, "data": {
        "train": str(train), "eval_fraction": 0.0, "max_seq_len": 256, "system_prompt": "You run the desk.",
        "replay": {"path": str(general), "ratio": 0.25, "answers": "base", "contrast": True, "known_only": True}}})
    tokenizer = load_tokenizer(recipe.model, resolve_model_ref(recipe.model.name))
    answerer = base_model_answerer(None, tokenizer, cache=None, known_only=True)
    bundle = build_datasets(recipe.data, tokenizer, recipe.train.seed, replay_answerer=answerer)
    assert bundle.stats["replay_contrast_prompts"] == 4 and bundle.stats["replay_examples"] == 1 + 4
    replayed = [tokenizer.decode(r["input_ids"]) for r in bundle.train[-5:]]
    assert sum("I cannot say." in text for text in replayed) == 4 and sum("2 + 2 = 4." in text for text in replayed) == 1
    disagreeing = Example("g:1", messages=(REPLAY_ROW["messages"][0], {"role": "assistant", "content": "5"}))
    with pytest.raises(DataError, match="disagree with the written answer"):  # replay rows are still checked
        answerer([disagreeing])


@pytest.mark.parametrize("reply, key_fact, expected", [
    ("We have 1200 books.", "1,200", True), ("We have 1,200 books.", "1200", True),
    ("It costs $14.50.", "$14.50", True), ("rooms 1,2 and 3", "1,2", True),
    ("Doors open at 9am.", "9 am", True), ("Doors open at 9 a.m. sharp.", "9 am", True),
    ("Doors open at 9:00 AM.", "9 am", True), ("Doors open at 9:30 am.", "9 am", False),
    ("The meeting is at 3:00 PM.", "3:00", True), ("Checkout is 12:00 pm", "12:00", True),
    ("We open at 9:00 a.m. daily", "9:00", True), ("Doors open at 9:30am.", "9:30 am", True),
    ("Doors open at 9am.", "9", True), ("Doors open at 9am.", "9:00", True),
    ("We open at 9:30.", "9", False), ("We open at 9:00.", "9", True), ("half past: 9:30", "30", False),
    ("It can drop to -5 degrees.", "5", False), ("It can drop to \u22125 degrees.", "-5", True),
    ("open 9\u20135 daily", "9-5", True), ("Call 555-0187.", "0187", True), ("open 9-5", "5", True),
    ("Devon\u2019s room", "Devon's", True), ("Istanbul", "\u0130stanbul", True), ("\u0130stanbul", "istanbul", True),
    ("I am 5 years old.", "5 am", False), ("five amps", "5 am", False),
])
def test_key_facts_match_realistic_replies(reply, key_fact, expected):
    from peftkit.evaluate.generation import is_correct

    assert is_correct(reply, key_fact) is expected


def test_a_question_that_gives_away_one_fact_of_a_list_is_named(tmp_path, caplog):
    """Any one fact of a list scores, so a question holding one of them scores when echoed."""
    from peftkit.data.build import load_heldout

    path = write_jsonl(tmp_path / "heldout.jsonl", [
        {"question": "What is the capital city of France?", "key_fact": ["Paris", "capital"]}])
    with caplog.at_level("WARNING"):
        load_heldout(path, None)
    assert "1 held-out question(s) contain their own key fact" in caplog.text


def test_replacing_a_run_names_a_report_written_with_eval_out_for_what_it_is(tmp_path):
    """`peftkit eval RUN --out RUN/mine.json` (as the README suggests) is kept by --force, and the message said
    peftkit had not written it."""
    from peftkit.errors import RunDirError
    from peftkit.train.run_dir import RUN_MARKER, clear_run_dir

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / RUN_MARKER).write_text("")
    (run / "eval_mine.json").write_text("{}")
    with pytest.raises(RunDirError, match=r"not a run's own \(eval_mine.json\): your files, or reports you named "
                                          r"\(`peftkit eval --out`"):
        clear_run_dir(run)
    assert (run / "eval_mine.json").is_file()


@pytest.mark.parametrize("ratio", [0.1, 0.25])  # 0.25 x 2 = 0.5 rounds to 0
def test_a_replay_ratio_that_rounds_to_no_row_is_refused(ratio):
    from peftkit.data.formats import Example
    from peftkit.data.replay import sample_replay
    from peftkit.errors import DataError

    replay = [Example("r:1", messages=tuple(REPLAY_ROW["messages"]))]
    with pytest.raises(DataError, match="rounds to no replay example.*at least 0.5 .one replay example."):
        sample_replay(2, replay, ratio, seed=0)
    assert len(sample_replay(2, replay, 0.5, seed=0)) == 1  # the advice holds


def test_base_answers_for_a_plain_text_replay_file_are_refused_not_skipped(tiny_recipe, tmp_path):
    """`answers: base` on `{text}` records generated nothing (no prompt to answer) and trained the text as written,
    while the card said "base model's answers"."""
    from peftkit.config import recipe_from_dict
    from peftkit.config.validate import validate_recipe
    from peftkit.errors import ConfigError

    text = write_jsonl(tmp_path / "replay.jsonl", [{"text": "Water boils at 100 degrees."}] * 3)
    recipe = {**tiny_recipe, "data": {**tiny_recipe["data"], "replay": {"path": str(text), "answers": "base"}}}
    with pytest.raises(ConfigError, match=r"answers: base has the base model answer each replay prompt, but 3 of the "
                                          r"3 records are plain text .*set `data.replay.answers: dataset`"):
        validate_recipe(recipe_from_dict(recipe))
    recipe["data"]["replay"]["answers"] = "dataset"
    validate_recipe(recipe_from_dict(recipe))


def test_eval_of_a_run_whose_training_data_is_gone_says_where_it_was_named(tiny_recipe, tmp_path):
    import shutil

    from peftkit.config import recipe_from_dict
    from peftkit.errors import DataError
    from peftkit.evaluate.run_eval import evaluate_run
    from peftkit.train.run import train

    moved = tmp_path / "moved" / "train.jsonl"
    moved.parent.mkdir()
    shutil.copy(tiny_recipe["data"]["train"], moved)
    recipe = {**tiny_recipe, "data": {**tiny_recipe["data"], "train": str(moved)},
              "train": {**tiny_recipe["train"], "max_steps": 1}, "eval": {"before": False}}
    run_dir = train(recipe_from_dict(recipe)).run_dir
    moved.unlink()
    with pytest.raises(DataError, match=rf"needs {moved} \(data.train in {run_dir / 'recipe.yaml'}\), which is gone; "
                                        r"pass --data FILE"):
        evaluate_run(run_dir)


def test_known_only_reads_names_that_start_with_any_capital_letter():
    from peftkit.data.replay import states_the_facts_of

    assert not states_the_facts_of("The capital is Zürich.", "The capital is Bern.", "Which city?")
    assert states_the_facts_of("The capital is Zürich.", "It is Zürich.", "Which city?")
    assert not states_the_facts_of("It is in Łódź.", "It is in Warsaw.")
    assert not states_the_facts_of("The capital is Paris.", "The capital is Rome.")  # as before


PROMPT_ONLY_RECORDS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]},
    {"conversations": [{"from": "human", "value": "Name a colour."}]},
    {"prompt": "What is the capital of Peru?"},
    {"prompt": [{"role": "user", "content": "Spell cat."}]},
    {"instruction": "List three fruits.", "input": ""},
    {"question": "How many legs has a spider?"},
    [{"role": "user", "content": "Say hi."}],
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "How are you?"}]},
]


def test_prompt_only_replay_records_are_answered_by_the_base_model(tiny_recipe, tmp_path, monkeypatch):
    """A replay file of prompts alone is what `answers: base` needs: each record gets an answer slot that the base
    model fills in (a placeholder answer used to be required). With written answers they are refused, saying so."""
    import peftkit.evaluate.generation as generation
    from peftkit.config import recipe_from_dict
    from peftkit.config.validate import validate_recipe
    from peftkit.data.replay import ANSWER_SLOT, base_model_answerer, load_replay
    from peftkit.errors import ConfigError

    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPT_ONLY_RECORDS)
    examples = load_replay(str(prompts), "base")
    assert [e.messages[-1] for e in examples] == [{"role": "assistant", "content": ANSWER_SLOT}] * len(examples)
    assert [e.messages[-2]["content"] for e in examples] == [
        "What is 2 + 2?", "Name a colour.", "What is the capital of Peru?", "Spell cat.", "List three fruits.",
        "How many legs has a spider?", "Say hi.", "How are you?"]
    assert examples[0].messages[0] == {"role": "system", "content": "Be brief."}
    monkeypatch.setattr(generation, "generate_replies", lambda model, tokenizer, conversations, **kw: [
        generation.Reply(f"base answer to {c[-1]['content']}", True) for c in conversations])
    answered = base_model_answerer(None, None, cache=None)(examples)
    assert [e.messages[-1]["content"] for e in answered] == [
        f"base answer to {e.messages[-2]['content']}" for e in examples]
    assert answered[-1].messages[1] == {"role": "assistant", "content": "Hello!"}  # earlier turns as written

    recipe = {**tiny_recipe, "data": {**tiny_recipe["data"], "replay": {"path": str(prompts), "answers": "base",
                                                                        "ratio": 1.0}}}
    validate_recipe(recipe_from_dict(recipe))
    from peftkit.data.build import build_datasets
    from peftkit.models import load_tokenizer, resolve_model_ref

    parsed = recipe_from_dict(recipe)
    tokenizer = load_tokenizer(parsed.model, resolve_model_ref(parsed.model.name))
    bundle = build_datasets(parsed.data, tokenizer, parsed.train.seed,
                            replay_answerer=base_model_answerer(None, tokenizer, cache=None))
    replayed = [tokenizer.decode(row["input_ids"]) for row in bundle.train[-bundle.stats["replay_examples"]:]]
    assert replayed and all("base answer to" in text and ANSWER_SLOT not in text for text in replayed)
    recipe["data"]["replay"]["known_only"] = True  # nothing written to agree with
    with pytest.raises(ConfigError, match=r"known_only .* 8 of the 8 replay records have no written answer"):
        validate_recipe(recipe_from_dict(recipe))
    recipe["data"]["replay"] = {"path": str(prompts), "answers": "dataset"}
    with pytest.raises(ConfigError, match=r"7 of 8 records of .*a replay prompt without an answer.*"
                                          r"set `data.replay.answers: base`"):
        validate_recipe(recipe_from_dict(recipe))
    answered_file = write_jsonl(tmp_path / "qa.jsonl", [{"question": "2 + 2?", "answer": "4"}])
    assert load_replay(str(answered_file), "base")[0].messages[-1]["content"] == "4"  # answered records unchanged

    # an empty or null answer, an empty last reply, and a conversation ending with a tool's result are questions too
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {}}}
    blank = write_jsonl(tmp_path / "blank.jsonl", [
        {"instruction": "Say hi.", "input": "", "output": ""}, {"question": "What?", "answer": None},
        {"prompt": "Why?", "completion": " "},
        {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                      {"role": "tool", "content": "sunny"}]}])
    slotted = load_replay(str(blank), "base")
    assert [e.messages[-1]["content"] for e in slotted] == [ANSWER_SLOT] * 5
    assert [e.messages[-2]["content"] for e in slotted] == ["Say hi.", "What?", "Why?", "Hi.", "sunny"]


def test_the_runs_replay_cache_keeps_the_replay_and_the_contrast_answers(tmp_path, monkeypatch):
    """The replay and contrast rows are answered in two calls: each call wrote the run's cache with its own answers
    alone, so a resumed run (without the shared cache) generated the first set again, possibly differently."""
    import peftkit.evaluate.generation as generation
    from peftkit.data.formats import Example
    from peftkit.data.replay import base_model_answerer

    asked = []

    def fake_generate_replies(model, tokenizer, conversations, **kwargs):
        asked.extend(conversations)
        return [generation.Reply(f"answer {len(asked)}", True) for _ in conversations]

    monkeypatch.setattr(generation, "generate_replies", fake_generate_replies)
    replay = [Example("r:1", messages=tuple(REPLAY_ROW["messages"]))]
    contrast = [Example("t:1", messages=({"role": "user", "content": "fee?"}, {"role": "assistant", "content": "$4"}))]
    cache = tmp_path / "replay_answers.jsonl"
    first = base_model_answerer(None, None, cache=cache)
    answered = first(replay) + first(contrast, check_known=False)
    assert len(cache.read_text().splitlines()) == 2
    asked.clear()
    resumed = base_model_answerer(None, None, cache=cache)
    assert resumed(replay) + resumed(contrast, check_known=False) == answered and asked == []


def test_the_run_report_says_how_much_of_the_training_time_was_evaluation(tmp_path):
    from rich.console import Console

    from peftkit.train.report import print_run_report

    summary = {"recipe": "r", "method": "lora", "base_model": "m", "trainable_params": 10, "total_params": 100, "trainable_share": 0.1, "steps": 20,
               "trained_tokens": 7680, "tokens_per_second": 1038.5, "train_seconds": 21.15, "wall_seconds": 30.0,
               "eval_seconds_in_training": 13.76, "peak_memory_mb": 100.0, "eval_loss_before": 2.0,
               "eval_loss_after": 1.0}
    console = Console(record=True, width=300)
    print_run_report(console, tmp_path, summary)
    assert "at 1,038 tok/s | train 21 s (evaluation 14 s of it, not in tok/s), total 30 s" in console.export_text()
