"""Fact scoring at word and number boundaries, what `peftkit eval` reports about its data, the exported
template's blank system message, and the Python API's argument checks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from peftkit.cli import main
from peftkit.config import recipe_from_dict
from peftkit.data.facts import matchable
from peftkit.errors import DataError, PeftkitError, RunDirError
from peftkit.evaluate.generation import is_correct
from peftkit.evaluate.run_eval import GENERAL_SET, RUN_EVAL_SPLIT, builtin_resource, evaluate_run
from peftkit.train.run import train
from tests.conftest import write_jsonl

# --- 1, 2: key facts -------------------------------------------------------------------------------------------------


def test_a_lone_string_key_fact_is_one_fact_not_its_characters():
    assert not is_correct("I have no idea", "Marta Okafor")
    assert is_correct("It is Marta Okafor.", "Marta Okafor")
    assert not is_correct("it is 4", "42") and is_correct("it is 42", "42")


@pytest.mark.parametrize("reply, facts", [
    ("365 * 12 = 312 months", ["12"]),
    ("Paris.", ["Paris"]),
    ("The answer is (4).", ["4"]),
    ("4, then 5", ["4"]),
    ("2 + 2 = 4", ["4"]),
    ("Pi is about 3.14.", ["3.14"]),
    ("It costs $14.", ["$14"]),
    ("It costs $14, not more", ["$14"]),
    ("The capital of Tunisia is Tunis.", ["Tunis"]),
    ("Die Katze schläft.", ["Katze"]),
    ("The run is 5km long", ["5"]),
    ("music of the 1990s", ["1990"]),
    ("Shakespeare's plays", ["Shakespeare"]),
    ("Tunis-Carthage airport", ["Tunis"]),
    ("CAFÉ", ["café"]),  # case and composed accents, as matchable makes them
    ("the answer is ４", ["4"]),  # full-width digit
    ("日本の首都は東京です。", ["東京"]),  # no spaces between words
    ("首都是北京", ["北京"]),
    ("서울은 한국의 수도입니다", ["서울"]),  # a particle glued to the noun
    ("เมืองหลวงคือกรุงเทพ", ["กรุงเทพ"]),
    ("东京Tokyo是首都", ["Tokyo"]),
    ("no, it is four", ["4", "four"]),
    ("Parking is $14.00 per night.", ["$14"]),  # zeros that leave the value as it is
    ("It costs 5.00 euros", ["5"]),
    ("It is £12.50", ["£12.5"]),
    ("Doors open at 07:30am.", ["7:30am"]),  # leading zeros
    ("from 09:00", ["9:00"]),
    ("We close at 18:00.", ["18:00"]),
    ("السعر ٣ دنانير", ["3"]),  # Arabic-Indic digit, both ways
    ("السعر 3 دنانير", ["٣"]),
    ("الرقم ۱۲", ["12"]),  # Persian digits
    ("सात ७ दिन", ["7"]),  # Devanagari
    ("Цена 1 200 рублей", ["1200"]),  # no-break space as thousands separator
    ("Prix : 1 200 €", ["1200"]),
    ("السعر ١٬٢٠٠", ["1200"]),  # Arabic thousands separator
    ("المُدِير هو سَامِي", ["سامي"]),  # vowel marks
    ("تقع في عمّان", ["عمان"]),  # shadda
    ("المكتب بالقاهرة", ["القاهرة"]),  # bi- before the word
    ("المكتبة", ["مكتبة"]),  # the article al-
    ("המשרד נמצא בתל אביב", ["תל אביב"]),  # Hebrew be-
    ("Кафе́ открыто", ["Кафе"]),  # a stress mark
    ("قال لأنه تأخر", ["ﻷنه"]),  # a lam-alef ligature (text from PDFs)
    ("وبالقاهرة", ["القاهرة"]),  # wa- bi- before the article
    ("в Москва́", ["Москва"]),
])
def test_a_key_fact_is_found_as_a_whole_word_or_number(reply, facts):
    assert is_correct(reply, facts)


@pytest.mark.parametrize("reply, facts", [
    ("2 + 2 equals 14.", ["4"]),
    ("The boiling point is 1000 degrees.", ["100"]),
    ("Breakfast costs $140.", ["$14"]),
    ("the capital of Tunisia", ["Tunis"]),
    ("Katzenrei", ["Katze"]),
    ("It is 4.5", ["4"]),
    ("It is 0.4", ["4"]),
    ("about 1,000 people", ["1"]),
    ("Pi is 3.141", ["3.14"]),
    ("a category", ["cat"]),
    ("it is 45", ["4"]),
    ("I have no idea", ["Marta Okafor"]),
    ("anything", [""]),  # an empty fact matches nothing
    ("It is 100", ["0"]),
    ("It is 10.05", ["10"]),
    ("It closes at 10:05.", ["5"]),  # the minutes of a time are not a number of their own
    ("at 12:05 pm", ["5"]),
    ("Pi is 12.501", ["12.5"]),
    ("it costs $14.0001", ["$14"]),
    ("السعر ٣٫٥", ["3"]),  # Arabic decimal separator: 3.5
    ("Цена 1 200 рублей", ["200"]),
    ("١٬٢٠٠", ["٢٠٠"]),
    ("سلامي", ["سامي"]),  # not a prefix: another word
    ("Йоханнак", ["Йоханна"]),
    ("١١٢", ["12"]),
    ("café", ["cafe"]),  # Latin accents are spelling
    ("й", ["и"]),
    ("מים", ["ים"]),  # water does not hold sea: prefix letters begin many Hebrew words
    ("לחם", ["חם"]),
    ("كمال", ["مال"]),  # Kamal does not hold money
    ("فعلي", ["علي"]),
    ("سئل", ["سيل"]),  # hamza is a letter, not an optional mark
    ("Горги", ["Ѓорѓи"]),  # Macedonian ѓ is no stressed г
    ("ѝ", ["и"]),  # Bulgarian: her is not and
])
def test_a_key_fact_inside_a_longer_word_or_number_is_not_found(reply, facts):
    assert not is_correct(reply, facts)


class CharTokenizer:
    """One token per character: prefixes of a reply are exactly its leading characters."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def test_the_margin_runs_to_the_fact_the_whole_reply_states():
    """A reply can hold the fact's text inside a longer number before it states the fact: the margin must reach
    the fact that scores, not stop at the `4` of `45` (which a prefix cut right after it would take for the fact)."""
    from peftkit.evaluate.margins import _tokens_to_fact

    reply = [ord(c) for c in "45 or 4. done"]
    assert _tokens_to_fact(CharTokenizer(), reply, ("4",)) == len("45 or 4")
    assert _tokens_to_fact(CharTokenizer(), [ord(c) for c in "Paris. yes"], ("Paris",)) == len("Paris")
    assert _tokens_to_fact(CharTokenizer(), [ord(c) for c in "it is 14"], ("4",)) is None


BENCHMARK_DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data"


@pytest.mark.parametrize("path", [builtin_resource(GENERAL_SET), BENCHMARK_DATA / "general_wide.jsonl",
                                  BENCHMARK_DATA / "general_check.jsonl"], ids=lambda p: p.name)
def test_no_forgetting_question_gives_its_answer_away(path):
    """A reply that repeats the question must not score: no key fact may stand in its own question."""
    given_away = []
    for line in path.read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        facts = [item["key_fact"]] if isinstance(item["key_fact"], str) else item["key_fact"]
        given_away += [(item["question"], f) for f in facts if is_correct(item["question"], f)
                       or matchable(f) in matchable(item["question"]).split()]
    assert not given_away


def test_the_forgetting_sets_accept_the_answers_as_they_are_usually_written():
    """Facts that were stems (`mitochondri`) or singular nouns matched inside their plurals before facts were
    matched as whole words: the usual answers still score."""
    sets = {}
    for path in (BENCHMARK_DATA / "general_wide.jsonl", BENCHMARK_DATA / "general_check.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            item = json.loads(line)
            sets[item["question"]] = item["key_fact"]
    for question, reply in [("What is the powerhouse of the cell?", "The mitochondria."),
                            ("What fruit is wine made from?", "Wine is made from grapes."),
                            ("What do squirrels like to collect and eat?", "They collect nuts."),
                            ("Which organs do you use to breathe?", "Your lungs."),
                            ("What is the opposite of 'open'?", "Closed."),
                            ("What do we call animals that eat only meat?", "They are carnivores.")]:
        assert is_correct(reply, sets[question]), question


# --- 3, 4, 6: `peftkit eval` on a run ---------------------------------------------------------------------------------


@pytest.fixture
def quick_run(tiny_recipe, tmp_path):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["train"] = {**recipe["train"], "max_steps": 1}
    recipe["eval"] = {**recipe["eval"], "before": False, "max_new_tokens": 4}
    return train(recipe_from_dict(recipe)).run_dir


@pytest.fixture
def small_general(tmp_path):
    return str(write_jsonl(tmp_path / "general.jsonl", [{"question": "one two", "key_fact": "three"}]))


def test_eval_refuses_an_eval_split_of_training_data_that_changed_since_the_run(quick_run, tiny_recipe, tmp_path,
                                                                                small_general, monkeypatch):
    report = evaluate_run(quick_run, general=small_general, compare_base=False)  # unchanged data: the split is rebuilt
    assert report["eval_examples"] == 4
    train_file = Path(tiny_recipe["data"]["train"])
    more = [{"messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": "nine."}]}
            for i in range(12)]
    train_file.write_text(train_file.read_text() + "".join(json.dumps(r) + "\n" for r in more))
    monkeypatch.setattr("peftkit.evaluate.run_eval.load_run", lambda *a, **k: pytest.fail("weights loaded first"))
    with pytest.raises(DataError, match=r"training data changed since .* its eval split cannot be rebuilt.*--data FILE"):
        evaluate_run(quick_run, general=small_general, compare_base=False)
    monkeypatch.undo()
    data = write_jsonl(tmp_path / "mine.jsonl", more[:3])
    report = evaluate_run(quick_run, data=str(data), general=small_general, compare_base=False,
                          out=tmp_path / "e.json")  # a file of one's own still evaluates
    assert report["eval_examples"] == 3


def test_eval_of_an_unchanged_run_needs_neither_the_same_tokens_nor_the_recipes_held_out_file(
        quick_run, tiny_recipe, tmp_path, small_general, caplog):
    """The split is checked by its examples: rows that tokenize differently now (a chat template writing today's
    date, a newer tokenizer) are the same split; and only the train / eval files are read for it, so a held-out file
    that moved is replaced with --heldout."""
    from peftkit.train.run_dir import BEFORE_FILE, check_resume_data

    before_file = quick_run / BEFORE_FILE
    before = json.loads(before_file.read_text())
    before_file.write_text(json.dumps({**before, "data_fingerprint": "tokenized differently"}))
    heldout = Path(tiny_recipe["data"]["heldout"])
    moved = heldout.rename(tmp_path / "moved-heldout.jsonl")
    report = evaluate_run(quick_run, heldout=str(moved), general=small_general, compare_base=False)
    assert report["eval_examples"] == 4 and report["heldout_questions"] > 0
    with caplog.at_level("WARNING"):  # resuming on the same examples, tokenized differently: a warning
        check_resume_data(quick_run, "tokenized again", before["split_fingerprint"], before["rows"])
    assert "tokenize differently now" in caplog.text
    with pytest.raises(RunDirError, match="data differ from those"):  # other row counts: the data order would differ
        check_resume_data(quick_run, "tokenized again", before["split_fingerprint"], [before["rows"][0] + 1, 4])


def test_an_eval_file_with_nothing_left_within_max_seq_len_is_refused(tiny_recipe, tmp_path, small_general):
    """An eval file rewritten after training with prompts longer than max_seq_len gave a report without a loss and
    without a word."""
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [{"messages": [{"role": "user", "content": "hello?"},
                                                                    {"role": "assistant", "content": "hi."}]}])
    recipe = copy.deepcopy(tiny_recipe)
    recipe["data"] = {**recipe["data"], "eval": str(eval_file)}
    recipe["train"] = {**recipe["train"], "max_steps": 1}
    recipe["eval"] = {**recipe["eval"], "before": False, "max_new_tokens": 2}
    run_dir = train(recipe_from_dict(recipe)).run_dir
    write_jsonl(eval_file, [{"messages": [{"role": "user", "content": "word " * 200},
                                          {"role": "assistant", "content": "hi."}]}])
    with pytest.raises(DataError, match="the run's eval data: none of its 1 examples has a supervised token left"):
        evaluate_run(run_dir, general=small_general, compare_base=False, out=tmp_path / "e.json")


def test_eval_data_the_run_trained_on_is_warned_about(quick_run, tiny_recipe, tmp_path, small_general, caplog):
    """`eval --data` on the training file measured memorisation without a word (training warns of the same)."""
    out = tmp_path / "e.json"
    with caplog.at_level("WARNING", logger="peftkit.evaluate"):
        evaluate_run(quick_run, data=tiny_recipe["data"]["train"], general=small_general, compare_base=False, out=out)
    trained = [r.getMessage() for r in caplog.records if "are ones" in r.getMessage()]
    assert len(trained) == 1 and f"trained on (first: {tiny_recipe['data']['train']}:" in trained[0]
    assert " of --data " in trained[0] and "measures memorisation" in trained[0]
    caplog.clear()
    new = write_jsonl(tmp_path / "new.jsonl", [{"messages": [{"role": "user", "content": "a new one?"},
                                                             {"role": "assistant", "content": "yes."}]}])
    with caplog.at_level("WARNING", logger="peftkit.evaluate"):
        evaluate_run(quick_run, data=str(new), general=small_general, compare_base=False, out=out)
    assert "memorisation" not in caplog.text


def test_the_eval_report_and_card_name_the_loss_data_and_reply_length(quick_run, tmp_path, small_general):
    report = evaluate_run(quick_run, general=small_general, compare_base=False, max_new_tokens=3)
    assert report["eval_data"] == RUN_EVAL_SPLIT and report["max_new_tokens"] == 3
    card = (quick_run / "README.md").read_text()
    assert "| loss (the run's eval split, as in Results, 4 rows) | n/a |" in card
    assert "up to 3 new tokens" in card
    data = write_jsonl(tmp_path / "other.jsonl", [{"messages": [{"role": "user", "content": "hello"},
                                                                {"role": "assistant", "content": "hello"}]}])
    report = evaluate_run(quick_run, data=str(data), general=small_general, compare_base=False)
    assert report["eval_data"] == str(data.resolve()) and report["max_new_tokens"] == 4  # the recipe's
    assert "| loss (`other.jsonl` (--data), 1 row) | n/a |" in (quick_run / "README.md").read_text()
    assert json.loads((quick_run / "eval.json").read_text())["eval_data"] == str(data.resolve())


def test_python_api_arguments_are_checked_before_weights_load(quick_run, small_general, monkeypatch):
    from peftkit import runs

    monkeypatch.setattr(runs, "load_base_model", lambda *a, **k: pytest.fail("weights loaded first"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PeftkitError, match="device='cuda' but no CUDA GPU is visible"):
        runs.load_run(quick_run, device="cuda")
    with pytest.raises(PeftkitError, match="device='gpu' is not one of auto, cpu, cuda, mps"):
        runs.load_run(quick_run, device="gpu")
    with pytest.raises(RunDirError, match=r"--qlora-base original has nothing to choose: drop it \(in Python, leave quantized_base at True\)"):
        runs.load_run(quick_run, quantized_base=False)
    for bad in (0, -1, 2.5):
        with pytest.raises(PeftkitError, match="max_new_tokens must be a whole number of at least 1"):
            evaluate_run(quick_run, general=small_general, max_new_tokens=bad)


def test_evaluate_run_refreshes_the_model_card_once(quick_run, small_general, monkeypatch):
    from peftkit.train import model_card

    written = []
    original = model_card.write_model_card
    monkeypatch.setattr(model_card, "write_model_card", lambda *a: written.append(a) or original(*a))
    (quick_run / "README.md").write_text("old card")
    evaluate_run(quick_run, general=small_general, compare_base=False)  # from Python, no CLI around it
    assert "## Evaluation (`peftkit eval`)" in (quick_run / "README.md").read_text() and len(written) == 1
    assert main(["eval", str(quick_run), "--general", small_general, "--no-base"]) == 0
    assert len(written) == 2, "`peftkit eval` writes the card once"
    evaluate_run(quick_run, general=small_general, compare_base=False, out=quick_run / "elsewhere.json")
    assert len(written) == 2, "a report the card does not show leaves it alone"


# --- 5: the exported chat template's blank system message ---------------------------------------------------------


@pytest.mark.parametrize("template", ["chatml", "llama2"])
def test_the_exported_template_takes_a_blank_system_message_for_none(tiny_recipe, tmp_path, template):
    """Training and `peftkit chat` replace a blank system turn with the recipe's system prompt (with_system_prompt):
    the template `peftkit merge` writes must render such a conversation the same way."""
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from peftkit.data.chat import with_system_prompt
    from peftkit.export.merge import load_run_tokenizer, resolve_run
    from tests.unit.export_fixtures import LLAMA2_TEMPLATE, make_run

    recipe = copy.deepcopy(tiny_recipe)
    recipe["data"]["system_prompt"] = "You are the library help desk."
    run = make_run(tmp_path / "run", recipe, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                        task_type="CAUSAL_LM"))
    if template == "llama2":
        saved = AutoTokenizer.from_pretrained(str(run / "tokenizer"))
        saved.chat_template = LLAMA2_TEMPLATE
        saved.save_pretrained(str(run / "tokenizer"))
    trained = AutoTokenizer.from_pretrained(str(run / "tokenizer"))  # the template as training used it
    exported = load_run_tokenizer(resolve_run(run))
    user = [{"role": "user", "content": "hi"}]

    def render(tokenizer, messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    as_trained = render(trained, with_system_prompt(user, recipe["data"]["system_prompt"]))
    assert render(exported, user) == as_trained
    for blank in ("", "   ", "\n", None):
        messages = [{"role": "system", "content": blank}, *user]
        assert render(exported, messages) == as_trained, repr(blank)
        assert render(exported, messages) == render(trained, with_system_prompt(messages, recipe["data"]["system_prompt"]))
    own = [{"role": "system", "content": "Be terse."}, *user]
    assert render(exported, own) == render(trained, own), "a system message of the client's own is kept"
    assert "Be terse." in render(exported, own)



def test_mean_loss_batched_longest_first_is_the_token_mean_of_each_row_alone(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from peftkit.data.chat import IGNORE_INDEX
    from peftkit.evaluate.loss import mean_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    rows = []
    for length in (5, 17, 9, 30, 3, 12, 22):  # other lengths in file order: sorting and padding must not change it
        ids = torch.randint(3, 100, (length,)).tolist()
        labels = [IGNORE_INDEX] * (length // 2) + ids[length // 2:]
        rows.append({"input_ids": ids, "labels": labels})
    total, count = 0.0, 0
    for row in rows:
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
        target = torch.tensor(row["labels"][1:])
        keep = target != IGNORE_INDEX
        total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
        count += int(keep.sum())
    widths: list[int] = []
    model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    assert mean_loss(model, rows, pad_token_id=0, batch_size=3, progress="eval loss") == pytest.approx(total / count,
                                                                                                      rel=1e-5)
    assert widths == [30, 12, 3]  # longest first: (30, 22, 17), (12, 9, 5), (3,)


def test_matchable_text_matched_again_is_unchanged():
    """The margin probe matches text made matchable once more: presentation forms (a lam-alef ligature brings out a
    hamza), marks between digits and stacked marks came out differently on a second pass."""
    import unicodedata

    ranges = [(0x0300, 0x0370), (0x0400, 0x0530), (0x0590, 0x0800), (0xFB1D, 0xFE00), (0xFE70, 0xFF00),
              (0xFF00, 0xFFEF), (0x2000, 0x2070)]
    contexts = ["{}", "\u0430{}", "1{}200", "\u0628{}", "{}1", "9{}", "\u0130{}\u0307"]
    for code in (c for low, high in ranges for c in range(low, high)):
        if unicodedata.category(chr(code)) == "Cn":
            continue
        for context in contexts:
            once = matchable(context.format(chr(code)))
            assert matchable(once) == once, (hex(code), context)
