"""`peftkit eval`, replay mixing, early stopping and the overfitting warning on the tiny model."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from peftkit.cli import main
from peftkit.config import recipe_from_dict
from peftkit.data.build import build_datasets
from peftkit.data.replay import replay_path, sample_replay
from peftkit.data.formats import Example, load_examples
from peftkit.errors import ConfigError, DataError, RunDirError
from peftkit.evaluate.run_eval import builtin_resource
from peftkit.runs import load_run
from peftkit.train.callbacks import OverfittingWatch
from peftkit.train.run import train
from tests.conftest import write_jsonl


def test_builtin_sets_are_packaged_and_valid():
    general = builtin_resource("general_knowledge.jsonl")
    rows = [json.loads(line) for line in general.read_text().splitlines()]
    assert len(rows) >= 20 and all("question" in r and "key_fact" in r for r in rows)
    replay = load_examples(replay_path("builtin:general"))
    assert len(replay) >= 60 and all(e.messages[-1]["role"] == "assistant" for e in replay)


BENCHMARK_DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data"
FORGETTING_SETS = {"builtin": builtin_resource("general_knowledge.jsonl"),
                   "wide": BENCHMARK_DATA / "general_wide.jsonl",
                   "check": BENCHMARK_DATA / "general_check.jsonl"}


@pytest.mark.parametrize("which", sorted(FORGETTING_SETS))
def test_builtin_replay_never_asks_the_forgetting_questions(which):
    """Replay is trained on; the general-knowledge sets measure forgetting: no question may be in both,
    and no replay prompt may name an answer of the built-in set (Paris, Shakespeare, ...; the check
    set's answers include everyday words such as Sun or Earth that replay prompts may well use)."""
    import re

    general = [json.loads(line) for line in FORGETTING_SETS[which].read_text().splitlines()]
    questions = {g["question"].lower().rstrip("?. ") for g in general}
    names = {f for g in general for f in ([g["key_fact"]] if isinstance(g["key_fact"], str) else g["key_fact"]) if f[0].isupper()}
    prompts = [e.messages[0]["content"] for e in load_examples(replay_path("builtin:general"))]
    lowered = [p.lower().rstrip("?. ") for p in prompts]
    assert len(lowered) == len(set(lowered)), "duplicate replay prompts"
    assert not questions & set(lowered)
    if which == "builtin":
        assert not [(p, n) for p in prompts for n in names if re.search(rf"\b{re.escape(n)}\b", p)]


def test_the_forgetting_sets_are_disjoint_and_well_formed():
    """Each question is asked once across the sets, and no key fact is a single letter (which
    would match almost any reply); single digits are answers to arithmetic."""
    seen: dict[str, str] = {}
    for which, path in FORGETTING_SETS.items():
        for line in path.read_text().splitlines():
            item = json.loads(line)
            facts = [item["key_fact"]] if isinstance(item["key_fact"], str) else item["key_fact"]
            assert facts and all(len(f.strip()) >= 2 or f.strip().isdigit() for f in facts), (which, item)
            key = item["question"].lower().rstrip("?. ")
            assert key not in seen, f"{item['question']!r} is in both {seen.get(key)} and {which}"
            seen[key] = which
    assert len(seen) >= 33 + 80 + 250


def test_sample_replay_is_deterministic_and_sized():
    replay = [Example(f"r{i}", text="y") for i in range(3)]
    picked = sample_replay(10, replay, 0.5, seed=1)
    assert len(picked) == 5 and picked == sample_replay(10, replay, 0.5, seed=1)
    assert {e.where for e in picked[:3]} == {"r0", "r1", "r2"}, "the pool is used up before repeating"


def test_replay_rows_keep_their_own_system_prompt(tiny_recipe, tmp_path):
    """Replay stands for general use: the recipe's domain system prompt is not put on it."""
    from peftkit.models import load_tokenizer, resolve_model_ref

    replay = write_jsonl(tmp_path / "replay.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                   {"role": "assistant", "content": "hello"}]}] * 4)
    recipe = recipe_from_dict({**tiny_recipe, "data": {**tiny_recipe["data"], "system_prompt": "DOMAINPROMPT", "max_seq_len": 512,
                                                       "replay": {"path": str(replay), "ratio": 0.25}}})
    tokenizer = load_tokenizer(recipe.model, resolve_model_ref(recipe.model.name))
    bundle = build_datasets(recipe.data, tokenizer, recipe.train.seed)
    plain = build_datasets(recipe.data.model_copy(update={"replay": None}), tokenizer, recipe.train.seed)
    n_replay = bundle.stats["replay_examples"]
    assert n_replay == 3 and bundle.train[:-n_replay] == plain.train
    assert any("DOMAINPROMPT" in tokenizer.decode(r["input_ids"]) for r in plain.train)
    assert not any("DOMAINPROMPT" in tokenizer.decode(r["input_ids"]) for r in bundle.train[-n_replay:])


def test_contrast_replays_the_training_prompts_without_the_system_prompt(tiny_recipe, tmp_path):
    """`contrast`: each training prompt once more, without the domain system prompt, answered by the answerer
    (the base model in training); conversations with a system turn of their own are not contrasted."""
    from peftkit.models import load_tokenizer, resolve_model_ref

    train_file = write_jsonl(tmp_path / "train.jsonl", [
        *({"messages": [{"role": "user", "content": f"domain question {i}"},
                        {"role": "assistant", "content": f"domain answer {i}"}]} for i in range(4)),
        {"messages": [{"role": "system", "content": "OWNSYSTEM"}, {"role": "user", "content": "own question"},
                      {"role": "assistant", "content": "own answer"}]}])
    general = write_jsonl(tmp_path / "general.jsonl", [{"messages": [{"role": "user", "content": "general question"},
                                                                     {"role": "assistant", "content": "general answer"}]}])
    recipe = recipe_from_dict({**tiny_recipe, "data": {"train": str(train_file), "eval_fraction": 0.0, "max_seq_len": 512,
                                                       "system_prompt": "DOMAINPROMPT",
                                                       "replay": {"path": str(general), "ratio": 0.2, "answers": "base",
                                                                  "contrast": True}}})
    tokenizer = load_tokenizer(recipe.model, resolve_model_ref(recipe.model.name))

    def base_answers(examples: list[Example], *, check_known: bool = True) -> list[Example]:
        return [Example(e.where, messages=(*e.messages[:-1], {"role": "assistant", "content": "BASEANSWER"}))
                for e in examples]

    bundle = build_datasets(recipe.data, tokenizer, recipe.train.seed, replay_answerer=base_answers)
    assert bundle.stats["replay_contrast_prompts"] == 4 and bundle.stats["replay_examples"] == 1 + 4
    replayed = [tokenizer.decode(r["input_ids"]) for r in bundle.train[-5:]]
    assert sum("general question" in text for text in replayed) == 1
    assert sorted(i for i in range(4) for text in replayed if f"domain question {i}" in text) == [0, 1, 2, 3]
    assert all("BASEANSWER" in text and "DOMAINPROMPT" not in text and "domain answer" not in text for text in replayed)
    assert not any("OWNSYSTEM" in text for text in replayed)
    domain = [tokenizer.decode(r["input_ids"]) for r in bundle.train[:-5]]
    assert len(domain) == 5 and all("DOMAINPROMPT" in t for t in domain if "OWNSYSTEM" not in t)


def test_eval_also_asks_the_general_set_with_the_recipes_system_prompt(tiny_recipe, tmp_path, capsys, monkeypatch):
    recipe = {**tiny_recipe, "data": {**tiny_recipe["data"], "system_prompt": "You answer for the desk."},
              "eval": {"before": False, "max_new_tokens": 6}}
    run_dir = train(recipe_from_dict(recipe)).run_dir
    general = write_jsonl(tmp_path / "general.jsonl", [{"question": f"one two {i}", "key_fact": "three"} for i in range(3)])
    from peftkit.evaluate import generation

    asked, generate = [], generation.generate_replies
    monkeypatch.setattr(generation, "generate_replies",
                        lambda *a, **kw: asked.append(kw.get("progress")) or generate(*a, **kw))
    assert main(["eval", str(run_dir), "--general", str(general)]) == 0
    # each question set is named on its progress bar (the general set is not "held-out questions")
    assert {"held-out questions (2)", "general questions (3)", "general questions in role (3)"} <= set(asked), asked
    report = json.loads((run_dir / "eval.json").read_text())
    in_role = report["details"]["general_in_role_details"]
    assert len(in_role) == 3 and report["general_questions"] == 3
    in_role_before = report["before"]["general_in_role_accuracy"]
    assert report["forgetting_in_role_points"] == (  # none when the base model knows none of it in role either
        pytest.approx(100 * (in_role_before - report["after"]["general_in_role_accuracy"])) if in_role_before else None)
    out = capsys.readouterr().out
    assert "asked with the system prompt" in out
    # captured output is no terminal: sentences stay whole lines (rich broke them at 80 columns)
    said = [line for line in out.splitlines() if line.startswith("forgetting: ")]
    assert len(said) == 1 and said[0].endswith(("it knows)", "system prompt)", "accuracy")), out
    card = (run_dir / "README.md").read_text()
    assert "| general knowledge, with the system prompt |" in card
    if report["before"]["general_accuracy"]:  # a tiny random model usually knows none of it: then forgetting is n/a
        assert "with the recipe's system prompt" in card
    else:
        assert "Forgetting: n/a" in card


def test_model_card_names_the_contrast_rows(tiny_recipe):
    from peftkit.train.model_card import _replay_row

    recipe = recipe_from_dict({**tiny_recipe, "data": {**tiny_recipe["data"], "system_prompt": "S",
                                                       "replay": {"contrast": True}}})
    row = _replay_row(recipe, {"data_stats": {"replay_examples": 7, "replay_contrast_prompts": 5}})
    assert row and "5 training prompts asked without the system prompt (contrast)" in row[0]
    plain = _replay_row(recipe, {"data_stats": {"replay_examples": 7, "replay_contrast_prompts": 0}})
    assert plain and "contrast" not in plain[0]


def test_replay_ratio_above_one_repeats_the_set(tiny_recipe, tmp_path):
    """A small domain set can draw more replay rows than it has examples; the set then repeats."""
    from peftkit.models import load_tokenizer, resolve_model_ref

    replay = write_jsonl(tmp_path / "replay.jsonl", [{"messages": [{"role": "user", "content": f"question {i}"},
                                                                   {"role": "assistant", "content": "an answer"}]}
                                                     for i in range(3)])
    recipe = recipe_from_dict({**tiny_recipe, "data": {**tiny_recipe["data"], "max_seq_len": 512,
                                                       "replay": {"path": str(replay), "ratio": 4.0}}})
    tokenizer = load_tokenizer(recipe.model, resolve_model_ref(recipe.model.name))
    bundle = build_datasets(recipe.data, tokenizer, recipe.train.seed)
    n_train = bundle.stats["train_examples"]
    assert bundle.stats["replay_examples"] == 4 * n_train > 3
    with pytest.raises(ConfigError, match="ratio"):
        recipe_from_dict({**tiny_recipe, "data": {**tiny_recipe["data"], "replay": {"path": str(replay), "ratio": 4.5}}})


def test_replay_adds_examples_to_training(tiny_recipe, tmp_path):
    replay = write_jsonl(tmp_path / "replay.jsonl", [{"text": "one two three four"}] * 5)
    recipe = recipe_from_dict({**tiny_recipe, "data": {**tiny_recipe["data"], "replay": {"path": str(replay), "ratio": 0.5}},
                               "train": {**tiny_recipe["train"], "max_steps": 1}, "eval": {"before": False}})
    result = train(recipe)
    summary = result.summary
    assert summary["data_stats"]["replay_examples"] == 6
    assert summary["train_examples"] == 12  # the recipe's own rows; the card names the replay rows apart
    card = (result.run_dir / "README.md").read_text()
    assert "(12 examples;" in card and "6 rows" in card


def test_eval_command_writes_report_and_updates_card(tiny_recipe, tmp_path, capsys, monkeypatch):
    run_dir = train(recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "batch_size": 2},  # eval in batches
                                      "eval": {"before": False, "max_new_tokens": 6}})).run_dir
    general = write_jsonl(tmp_path / "general.jsonl", [{"question": "one two", "key_fact": "three"}] * 3)
    monkeypatch.chdir(run_dir.parent)
    assert main(["eval", run_dir.name, "--general", str(general)]) == 0  # a relative RUN_DIR
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["general_questions"] == 3 and report["heldout_questions"] == 2 and report["run_dir"] == str(run_dir)
    # One definition of eval loss (a token mean over the set) in training's summary and in `peftkit eval`.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert report["after"]["loss"] == pytest.approx(summary["eval_loss_after"], rel=1e-4)
    assert report["before"]["loss"] == pytest.approx(summary["eval_loss_before"], rel=1e-4)
    assert report["after"]["loss"] != pytest.approx(report["before"]["loss"]), "base and tuned are different models"
    before_general = report["before"]["general_accuracy"]
    assert report["forgetting_points"] == (  # none when the tiny base model knows none of the set
        pytest.approx(100 * (before_general - report["after"]["general_accuracy"])) if before_general else None)
    card = (run_dir / "README.md").read_text()
    assert "Evaluation (`peftkit eval`)" in card
    assert "| general knowledge (3 q, `general.jsonl`) |" in card and "| held-out fact accuracy (2 q, `heldout.jsonl`) |" in card
    assert f"peftkit chat {run_dir}\n" in card, "the card names the run by a path that works from anywhere"
    import shutil

    from peftkit.config import load_recipe
    from peftkit.train.model_card import write_model_card

    spaced = Path(shutil.copytree(run_dir, tmp_path / "runs ü" / "x"))  # pasted, an unquoted path is two arguments
    write_model_card(spaced, load_recipe(spaced / "recipe.yaml"), summary)
    assert f"peftkit chat '{spaced}'\n" in (spaced / "README.md").read_text()
    assert "general knowledge" in capsys.readouterr().out
    assert report["forgetting_in_role_points"] is None and "general_in_role_accuracy" not in report["after"], \
        "no system prompt, no second measurement"
    # Arguments that cannot work are said before anything loads.
    (tmp_path / "a-folder").mkdir()
    assert main(["eval", str(run_dir), "--out", str(tmp_path / "a-folder")]) == 2
    assert "is a folder; give the report's file name" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens: must be at least 1, got 0" in capsys.readouterr().err
    bad_general = write_jsonl(tmp_path / "bad.jsonl", [{"question": "one two"}])
    assert main(["eval", str(run_dir), "--general", str(bad_general)]) == 2
    assert "general-set records need `question`" in capsys.readouterr().err
    first = (run_dir / "eval.json").read_text()
    assert main(["eval", str(run_dir), "--no-base", "--out", str(tmp_path / "other" / "check.json")]) == 0
    assert (run_dir / "eval.json").read_text() == first, "--out leaves the run's own report alone"
    assert json.loads((tmp_path / "other" / "check.json").read_text())["general_questions"] > 3  # the built-in set
    Path(tiny_recipe["data"]["heldout"]).unlink()  # the recipe's held-out file moved away since training
    assert main(["eval", str(run_dir), "--no-base"]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert f"(data.heldout in {run_dir / 'recipe.yaml'}) are gone; pass --heldout FILE" in said


def test_eval_of_a_full_finetune_compares_with_the_base_model(tiny_recipe, tmp_path):
    """Full runs save the whole tuned model (no adapter to switch off): "before" must load the base again."""
    recipe = {**tiny_recipe, "adapter": {"method": "full"}, "eval": {"before": False, "max_new_tokens": 4},
              "train": {**tiny_recipe["train"], "lr": 1e-3}}
    run_dir = train(recipe_from_dict(recipe)).run_dir
    general = write_jsonl(tmp_path / "general.jsonl", [{"question": "one two", "key_fact": "three"}] * 2)
    assert main(["eval", str(run_dir), "--general", str(general)]) == 0
    report = json.loads((run_dir / "eval.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert report["before"]["loss"] == pytest.approx(summary["eval_loss_before"], rel=1e-4)
    assert report["after"]["loss"] == pytest.approx(summary["eval_loss_after"], rel=1e-4)
    assert report["after"]["loss"] < report["before"]["loss"]


def test_overfitting_watch_warns_once(caplog):
    watch = OverfittingWatch()
    with caplog.at_level(logging.WARNING):
        for train_loss, eval_loss in [(2.0, 1.5), (1.5, 1.4), (1.0, 1.45), (0.5, 1.6), (0.2, 1.8)]:
            watch.on_log(None, None, None, logs={"loss": train_loss})
            watch.on_evaluate(None, None, None, metrics={"eval_loss": eval_loss})
    assert watch.warned
    assert sum("Overfitting" in r.message for r in caplog.records) == 1


def test_a_resumed_overfitting_watch_goes_on_from_the_earlier_sessions_evaluations(caplog, tmp_path):
    """Resumed after three evaluations, the next rise in a row is warned about as in the uninterrupted run (the watch
    kept its evaluations in memory only, so a resumed run never warned). They are read from metrics.jsonl: the
    checkpoint's log_history lacks the last one when it followed the save (an epoch's closing evaluation)."""
    history = _history([(10, 2.0, 1.5), (20, 1.5, 1.4), (30, 1.0, 1.45)])
    write_jsonl(tmp_path / "metrics.jsonl", history)
    watch = OverfittingWatch(metrics=tmp_path / "metrics.jsonl")
    with caplog.at_level(logging.WARNING):
        watch.on_train_begin(None, SimpleNamespace(log_history=history[:-1]), None)
        assert not watch.warned
        watch.on_log(None, None, None, logs={"loss": 0.5})
        watch.on_evaluate(None, None, None, metrics={"eval_loss": 1.6})
    assert watch.warned and sum("Overfitting" in r.message for r in caplog.records) == 1
    said = OverfittingWatch()
    said.warned = True  # an earlier session of the run warned already
    with caplog.at_level(logging.WARNING):
        said.on_train_begin(None, SimpleNamespace(log_history=history + _history([(40, 0.5, 1.6)])), None)
    assert sum("Overfitting" in r.message for r in caplog.records) == 1


def test_overfitting_watch_with_more_evaluations_than_logged_losses(caplog):
    """eval_steps below logging_steps: two evaluations see the same logged train loss, which still falls overall."""
    watch = OverfittingWatch()
    with caplog.at_level(logging.WARNING):
        for train_loss, eval_loss in [(2.0, 1.5), (2.0, 1.4), (1.0, 1.45), (1.0, 1.6)]:
            watch.on_log(None, None, None, logs={"loss": train_loss})
            watch.on_evaluate(None, None, None, metrics={"eval_loss": eval_loss})
    assert watch.warned
    flat = OverfittingWatch()  # both losses rising with nothing learnt on the training side: not overfitting
    for eval_loss in [1.5, 1.6, 1.7]:
        flat.on_log(None, None, None, logs={"loss": 2.0})
        flat.on_evaluate(None, None, None, metrics={"eval_loss": eval_loss})
    assert not flat.warned


def _history(points):
    """log_history as the Trainer keeps it: (step, train loss or None, eval loss or None)."""
    return [entry for step, train_loss, eval_loss in points for entry in (
        [{"step": step, "loss": train_loss}] if train_loss is not None else []) + (
        [{"step": step, "eval_loss": eval_loss}] if eval_loss is not None else [])]


def test_a_run_that_ends_on_one_large_eval_loss_rise_is_warned_about(caplog):
    """A short run with few evaluations: the best at step 40, the last (shipped) 31 % above it; no two rises in a row."""
    jump = _history([(0, None, 6.762), (8, 4.0, 6.793), (40, 3.8, 6.713), (48, 3.61, 8.799)])
    watch = OverfittingWatch()
    with caplog.at_level(logging.WARNING):
        watch.check_final(jump, ships_best=True)  # early stopping shipped the best weights: nothing to say
        assert not watch.warned
        watch.check_final(jump, ships_best=False)
        watch.check_final(jump, ships_best=False)
    assert watch.warned and sum("Overfitting" in r.message for r in caplog.records) == 1
    assert "8.799 is 31% above the best, 6.713 at step 40" in caplog.text
    # the defaults' small late rise after a large gain, a rise with the train loss rising too, a best at the end,
    # a diverged (NaN) last evaluation, and a flat noisy curve whose last point is not its highest
    import random

    rng = random.Random(0)
    flat = [(0, None, 2.0)] + [(step, 2.0 - step / 1000, 1.0 + rng.gauss(0, 0.05)) for step in range(10, 500, 10)]
    flat.append((500, 1.5, max(loss for *_, loss in flat[1:]) - 0.01))
    for points in ([(0, None, 2.86), (20, 1.6, 1.30), (40, 0.5, 1.05), (60, 0.2, 1.12)],
                   [(0, None, 6.762), (8, 4.0, 6.793), (40, 3.8, 6.713), (48, 4.2, 8.799)],
                   [(0, None, 2.86), (20, 1.6, 1.30), (40, 0.5, 1.05)],
                   [(0, None, 6.762), (8, 4.0, 6.793), (40, 3.8, 6.713), (48, 3.6, float("nan"))], flat):
        quiet = OverfittingWatch()
        quiet.check_final(_history(points), ships_best=False)
        assert not quiet.warned, points


@pytest.mark.parametrize("every", ["eval_steps", "save_steps"])
def test_early_stopping_stops_and_keeps_best(tiny_recipe, every):
    """Evaluations every eval_steps, or (with save_steps alone) at every checkpoint: the Trainer needs them to match."""
    recipe = recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "epochs": 30, "lr": 0.5, every: 1,
                                                        "early_stopping_patience": 1}, "eval": {"before": False}})
    result = train(recipe)
    summary = result.summary
    assert summary["stopped_early"] is True
    assert summary["steps"] < 30 * 3
    assert 1 <= summary["weights_from_step"] < summary["steps"]  # the best evaluation came before patience ran out
    card = (result.run_dir / "README.md").read_text()
    assert f"| steps / supervised tokens | {summary['steps']} (stopped early; the weights are step " \
           f"{summary['weights_from_step']}'s, the best evaluation) /" in card


def test_self_distilled_replay_uses_the_base_models_answers_and_caches_them(tiny_model_dir, tiny_tokenizer, tmp_path,
                                                                            monkeypatch):
    from transformers import AutoModelForCausalLM

    from peftkit.data.replay import answers_from_base, base_model_answerer, shared_cache_path
    from peftkit.evaluate import generation

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    calls = []

    def fake_generate(model, tokenizer, conversations, **kwargs):  # the base model's greedy answers
        calls.append([c[-1]["content"] for c in conversations])
        return [generation.Reply(f"base says {c[-1]['content']}", finished=c[-1]["content"] != "long") for c in conversations]

    monkeypatch.setattr(generation, "generate_replies", fake_generate)

    def chat(question):
        return Example(question, messages=({"role": "user", "content": question}, {"role": "assistant", "content": "WRITTEN"}))

    examples = [chat("short"), Example("t", text="plain text stays"), chat("long"), chat("short")]
    run_cache, shared = tmp_path / "run.jsonl", shared_cache_path(model, tiny_tokenizer, 8)
    assert shared == shared_cache_path(model, tiny_tokenizer, 8) != shared_cache_path(model, tiny_tokenizer, 9)
    shared = tmp_path / "shared" / shared.name
    answered = base_model_answerer(model, tiny_tokenizer, cache=run_cache, shared_cache=shared, max_new_tokens=8)(examples)
    assert calls == [["short", "long"]], "each distinct prompt is generated once"
    assert [e.messages[-1]["content"] if e.messages else e.text for e in answered] == [
        "base says short", "plain text stays", "base says short"], "unfinished answers are left out"
    assert run_cache.is_file() and shared.is_file()
    again = base_model_answerer(model, tiny_tokenizer, cache=None, shared_cache=shared, max_new_tokens=8)(examples)
    assert again == answered and len(calls) == 1, "a second run on the same base reads the cache"
    worker_cache = tmp_path / "worker" / "run.jsonl"  # a worker process (not rank 0) of a run
    worker = base_model_answerer(model, tiny_tokenizer, cache=worker_cache, shared_cache=shared, write_caches=False,
                                 max_new_tokens=8)
    assert worker(examples) == answered and len(calls) == 1, "worker processes read the answers rank 0 keeps"
    assert not worker_cache.exists(), "only rank 0 writes the caches"
    worker_new = base_model_answerer(model, tiny_tokenizer, cache=run_cache, shared_cache=tmp_path / "none.jsonl",
                                     write_caches=False, max_new_tokens=8)
    assert worker_new([chat("short"), chat("other")])[0].messages[-1]["content"] == "base says short"
    assert calls[1:] == [["other"]] and not (tmp_path / "none.jsonl").exists(), "it generates only what is missing"
    assert answers_from_base("builtin:general", "auto") and not answers_from_base("my.jsonl", "auto")
    facts = [Example("f", messages=({"role": "user", "content": "q"}, {"role": "assistant", "content": "It is short Short."})),
             Example("g", messages=({"role": "user", "content": "q"}, {"role": "assistant", "content": "It is 7 Paris."})),
             Example("h", messages=({"role": "user", "content": "short"}, {"role": "assistant", "content": "Yes."}))]
    monkeypatch.setattr(generation, "generate_replies", lambda m, t, conversations, **kw: [
        generation.Reply({"q": "it is short", "short": "no"}[c[-1]["content"]], finished=True) for c in conversations])
    checked = base_model_answerer(model, tiny_tokenizer, cache=None, known_only=True)(facts)
    assert [e.where for e in checked] == ["f", "h"], "known_only drops the answers that miss the written facts"
    assert answers_from_base("my.jsonl", "base") and not answers_from_base("builtin:general", "dataset")


def test_eval_puts_a_qlora_adapter_on_the_original_weights_when_asked(tiny_recipe, tmp_path):
    """--qlora-base original: the adapter on the unquantized base (as a serving engine loads it), reported in
    its own file; the as-trained eval.json is left as it was."""
    from tests.unit.adapters_fixtures import recipe_for

    recipe = recipe_for(tiny_recipe, "qlora", tmp_path)
    recipe["eval"] = {"before": False, "max_new_tokens": 4}
    run_dir = train(recipe_from_dict(recipe)).run_dir
    general = write_jsonl(tmp_path / "general.jsonl", [{"question": "one two", "key_fact": "three"}] * 2)
    assert main(["eval", str(run_dir), "--general", str(general)]) == 0
    trained = (run_dir / "eval.json").read_text()
    assert main(["eval", str(run_dir), "--general", str(general), "--qlora-base", "original"]) == 0
    assert (run_dir / "eval.json").read_text() == trained
    quantized, original = json.loads(trained), json.loads((run_dir / "eval_original_base.json").read_text())
    assert original["base_weights"].startswith("original") and quantized["base_weights"] == "as trained"
    # the 4-bit round trip moves the base model's loss; on the original weights it is the fp32 base's own
    assert original["before"]["loss"] != pytest.approx(quantized["before"]["loss"], rel=1e-6)
    assert original["after"]["loss"] != pytest.approx(original["before"]["loss"]), "the adapter is on"
    layers = {type(m).__name__ for m in load_run(run_dir, quantized_base=False).model.modules()}
    assert "Linear4bit" not in layers and "Linear" in layers
    assert main(["chat", str(run_dir), "--prompt", "one two", "--max-new-tokens", "2", "--qlora-base", "original"]) == 0


def test_eval_refuses_qlora_base_original_for_an_unquantized_run(tiny_recipe, capsys):
    run_dir = train(recipe_from_dict({**tiny_recipe, "eval": {"before": False}})).run_dir
    assert main(["eval", str(run_dir), "--qlora-base", "original"]) == RunDirError.exit_code
    assert "was not trained on a quantized base, so --qlora-base original has nothing to choose" in capsys.readouterr().err
    assert not (run_dir / "eval_original_base.json").exists()
    assert main(["chat", str(run_dir), "--prompt", "hi", "--qlora-base", "original"]) == RunDirError.exit_code
    assert "--qlora-base original has nothing to choose: drop it" in capsys.readouterr().err
    out = run_dir.parent / "merged"
    assert main(["merge", str(run_dir), "--out", str(out), "--qlora-base", "original"]) == 2  # merge took it silently
    assert "--qlora-base original has nothing to choose: drop it" in capsys.readouterr().err and not out.exists()


def test_weight_moving_inits_report_the_base_models_loss_before_training(tiny_recipe):
    """PiSSA / CorDA leave a residual base under the adapter: "before" is the untrained adapted model there,
    and it must equal the base model's loss (the adapter switched off would be the residual)."""
    losses = {}
    for init in ("default", "pissa", "corda_kpm"):
        recipe = recipe_from_dict({**tiny_recipe, "adapter": {**tiny_recipe["adapter"], "init": init},
                                   "train": {**tiny_recipe["train"], "max_steps": 1}, "eval": {"before": False},
                                   "output_dir": f"{tiny_recipe['output_dir']}-{init}"})
        losses[init] = train(recipe).summary["eval_loss_before"]
    assert losses["pissa"] == pytest.approx(losses["default"], rel=1e-4)
    assert losses["corda_kpm"] == pytest.approx(losses["default"], rel=1e-4)


@pytest.mark.parametrize(("written", "reply", "prompt", "agrees"), [
    ("The capital of Argentina is Buenos Aires.", "Argentina's capital is Buenos Aires.", "Capital of Argentina?", True),
    ("The capital of Argentina is Buenos Aires.", "Alberta, Argentina is a country.", "Capital of Argentina?", False),
    ("A standard piano has 88 keys.", "It has 888 keys.", "How many keys does a piano have?", False),
    ("Light travels at about 300,000 km per second.", "About 300000 kilometres each second.", "", True),
    ("An insect has six legs.", "An insect has 6 legs.", "", True),
    ("An insect has six legs.", "An insect has 8 legs.", "", False),
    ("12 times 3 is 36.", "36", "What is 12 times 3?", True),  # numbers of the prompt are not required
    ("Slow down and practise a few minutes a day.", "Practise daily.", "How can I write better?", True),
    ("George Washington was the first president.", "It was John F. Kennedy.", "", False),
])
def test_states_the_facts_of(written, reply, prompt, agrees):
    from peftkit.data.replay import states_the_facts_of

    assert states_the_facts_of(written, reply, prompt) is agrees


def test_eval_checks_its_data_files_before_loading_weights_and_refuses_data_without_loss(tiny_recipe, tmp_path,
                                                                                         capsys, monkeypatch):
    run_dir = train(recipe_from_dict({**tiny_recipe, "eval": {"before": False}})).run_dir
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [\n')
    with monkeypatch.context() as patched:
        patched.setattr("peftkit.evaluate.run_eval.load_run", lambda *a, **k: pytest.fail("weights loaded first"))
        assert main(["eval", str(run_dir), "--data", str(broken), "--no-base"]) == 2
    assert "broken.jsonl:1" in capsys.readouterr().err
    long = write_jsonl(tmp_path / "long.jsonl", [{"messages": [{"role": "user", "content": "one two " * 400},
                                                               {"role": "assistant", "content": "three"}]}])
    assert main(["eval", str(run_dir), "--data", str(long), "--no-base", "--out", str(tmp_path / "e.json")]) == 2
    assert "no example has any supervised token left" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()


def test_the_eval_report_says_forgetting_is_undefined_when_the_base_model_knows_none_of_the_set():
    """A forgetting of +0.0 points would read as 'nothing lost' when nothing was known to begin with."""
    from rich.console import Console

    from peftkit.evaluate.run_eval import print_eval_report

    def printed(before: float, after: float) -> str:
        console = Console(record=True, width=200)
        report = {"run_dir": "runs/x", "heldout_questions": 4, "general_questions": 33, "forgetting_points": 100 * (before - after),
                  "before": {"general_accuracy": before}, "after": {"general_accuracy": after}}
        print_eval_report(console, report)
        return console.export_text()

    assert "forgetting: n/a (the base model answers none of the 33 general questions" in printed(0.0, 0.0)
    assert "forgetting: lost 10.0 points of general-knowledge accuracy" in printed(0.5, 0.4)
    assert "forgetting: gained 10.0 points of general-knowledge accuracy" in printed(0.4, 0.5)  # not "-10.0"


def test_the_model_card_says_forgetting_is_undefined_when_the_base_model_knows_none_of_the_set(tmp_path):
    """The card must not say +0.0 points where the terminal says n/a."""
    from peftkit.train.model_card import _eval_section

    def card(before: float, after: float) -> str:
        (tmp_path / "eval.json").write_text(json.dumps({
            "forgetting_points": 100 * (before - after), "before": {"general_accuracy": before},
            "after": {"general_accuracy": after}}))
        return "\n".join(_eval_section(tmp_path))

    assert "Forgetting: n/a (the base model answers none of the general questions" in card(0.0, 0.0)
    assert "Forgetting: lost 10.0 points of general-knowledge accuracy" in card(0.5, 0.4)


def test_eval_json_has_no_forgetting_figure_when_the_base_model_knows_none_of_the_set():
    """eval.json said 0.0 points where the terminal and the card say n/a."""
    from peftkit.evaluate.run_eval import _points_lost

    assert _points_lost({"general_accuracy": 0.0}, {"general_accuracy": 0.0}, "general_accuracy") is None
    assert _points_lost({"general_accuracy": 0.5}, {"general_accuracy": 0.4}, "general_accuracy") == 10.0
    assert _points_lost({}, {"general_accuracy": 0.4}, "general_accuracy") is None


def test_a_replay_with_no_answer_left_is_an_error_with_a_fix_that_works(tiny_model_dir, tiny_tokenizer, monkeypatch,
                                                                         caplog):
    """The recipe asks for replay: training without it is refused, and a higher limit helps only up to max_seq_len."""
    from transformers import AutoModelForCausalLM

    from peftkit.data.replay import base_model_answerer
    from peftkit.evaluate import generation

    monkeypatch.setattr(generation, "generate_replies", lambda m, t, conversations, **kw: [
        generation.Reply("cut off", finished=c[-1]["content"] == "a") for c in conversations])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    examples = [Example(q, messages=({"role": "user", "content": q}, {"role": "assistant", "content": "W"})) for q in "abc"]
    with caplog.at_level(logging.WARNING):
        assert len(base_model_answerer(model, tiny_tokenizer, cache=None, max_new_tokens=4)(examples)) == 1
    assert "2 of 3 replay answers did not finish within 4 tokens and were left out" in caplog.text, "a shortfall warns"
    with pytest.raises(DataError, match=r"data.replay: none of the base model's 2 replay answers is usable \(2 did not "
                                        r"finish within data.replay.max_answer_tokens=4 tokens\), so the run would "
                                        r"train without the replay the recipe asks for; raise data.replay.max_answer_"
                                        r"tokens \(that helps up to data.max_seq_len only.*`data.replay.answers: dataset`"):
        base_model_answerer(model, tiny_tokenizer, cache=None, max_new_tokens=4)(examples[1:])


def test_a_replay_file_in_no_standard_layout_is_not_pointed_at_data_columns(tmp_path):
    """data.columns never reads a replay file, so its advice cannot help there."""
    from peftkit.data.replay import load_replay

    odd = write_jsonl(tmp_path / "odd.jsonl", [{"Frage": "Wie spät?", "Antwort": "Neun."}] * 2)
    with pytest.raises(DataError, match=r"unrecognised record \(keys: Frage, Antwort\).*`text`; a replay file must "
                                        r"be in one of those layouts as written \(data.columns and data.format apply "
                                        r"to data.train and data.eval only\)") as caught:
        load_replay(str(odd))
    assert "add a map" not in str(caught.value)
    dialog = write_jsonl(tmp_path / "dialog.jsonl", [{"dialog": [{"speaker": "user", "text": "Hi"},
                                                                 {"speaker": "bot", "text": "Hello"}]}])
    with pytest.raises(DataError, match="a replay file must be in one of those layouts as written") as caught:
        load_replay(str(dialog))
    assert "columns" not in str(caught.value).split("(data.columns and data.format apply")[0]
    speakers = write_jsonl(tmp_path / "s.jsonl", [{"messages": [{"role": "kunde", "content": "Hallo"},
                                                                {"role": "assistant", "content": "Hi"}]}])
    with pytest.raises(DataError, match=r"unknown role 'kunde'; .* \(data.columns.roles does not apply to replay files\)"):
        load_replay(str(speakers))
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [  # the records after the unknown role were cut off the message
        {"messages": [{"role": "kunde", "content": "Hallo"}, {"role": "assistant", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]}])
    with pytest.raises(DataError) as caught:
        load_replay(str(mixed))
    assert str(caught.value).startswith("3 records of") and len(str(caught.value).splitlines()) == 4
    assert "mixed.jsonl:2:" in str(caught.value) and "mixed.jsonl:3:" in str(caught.value)


def test_eval_data_in_a_standard_layout_is_read_though_the_run_maps_other_fields(tiny_recipe, tmp_path, caplog):
    """`eval --data` used the run recipe's data.columns for any file: a standard chat file failed on 'Frage'."""
    from peftkit.evaluate.run_eval import eval_data_examples

    columns = {"prompt": "Frage", "response": "Antwort"}
    recipe = recipe_from_dict({**tiny_recipe, "data": {**tiny_recipe["data"], "columns": columns}})
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hours?"},
                                                               {"role": "assistant", "content": "Nine."}]}])
    with caplog.at_level(logging.INFO, logger="peftkit.evaluate.run_eval"):
        assert [e.format for e in eval_data_examples(str(chat), recipe, tmp_path / "run")] == ["chat"]
    assert "does not fit the run's data.columns map; its format was detected instead" in caplog.text
    mapped = write_jsonl(tmp_path / "de.jsonl", [{"Frage": "Wie spät?", "Antwort": "Neun.", "text": "not this"}])
    assert eval_data_examples(str(mapped), recipe, tmp_path / "run")[0].format == "columns", "the map comes first"
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"Question": "Hours?", "Reply": "Nine."}])
    with pytest.raises(DataError, match=r"is in no standard layout .* so it was read with the run's data.columns map "
                                        r"\(from .*run/recipe.yaml\), and that fails: .*the prompt field 'Frage' is "
                                        r"missing"):
        eval_data_examples(str(odd), recipe, tmp_path / "run")
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"messages": [{"role": "assistant", "content": "Hi"}]}])
    with pytest.raises(DataError, match="no assistant turn|roles out of order"):  # its own layout's mistake, not the map's
        eval_data_examples(str(broken), recipe, tmp_path / "run")


def test_run_report_and_card_show_what_the_summary_records(tiny_recipe, tmp_path):
    """An overfitting warning and the best step's weights are in the run report and the card, not only in
    summary.json; losses keep four decimals (5.9996 is not "6")."""
    from rich.console import Console

    from peftkit.train.model_card import write_model_card
    from peftkit.train.report import print_run_report

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = {"recipe": "r", "method": "lora", "base_model": "m", "eval_loss_before": 5.99961, "eval_loss_after": 5.2,
               "trainable_params": 10, "total_params": 100, "trainable_share": 0.1, "steps": 20, "trained_tokens": 400,
               "tokens_per_second": 12345.6, "train_seconds": 3.0, "wall_seconds": 4.0, "peak_memory_mb": 100.0,
               "overfitting_warning": True, "stopped_early": False, "weights_from_step": 12, "train_examples": 8,
               "device": "cpu", "threads": 1}
    console = Console(record=True, width=300)
    print_run_report(console, run_dir, summary)
    printed = console.export_text()
    assert "overfitting: the eval loss rose while the train loss kept falling" in printed
    assert "the saved weights are step 12's, the best evaluation" in printed and "5.9996" in printed
    write_model_card(run_dir, recipe_from_dict(tiny_recipe), summary)
    card = (run_dir / "README.md").read_text()
    assert "| eval loss | 5.9996 | 5.2000 |" in card and "| speed | 12,346 supervised tokens/s" in card
    assert "Overfitting warning" in card and "| 20 (the weights are step 12's, the best evaluation) / 400 |" in card


def test_a_run_that_left_the_eval_loss_above_the_base_models_says_so(tiny_recipe, tmp_path):
    """Prefix tuning without its projection at lr 1e-3 took a trial's eval loss from 3.01 to 9.13 in three steps, and
    the report printed the two numbers without a word; a rise within 1 % (noise) is not called worse."""
    from rich.console import Console

    from peftkit.train.model_card import write_model_card
    from peftkit.train.report import eval_loss_rose, print_run_report

    summary = {"recipe": "r", "method": "prefix_tuning", "base_model": "m", "eval_loss_before": 3.0097,
               "eval_loss_after": 9.1312, "trainable_params": 10, "total_params": 100, "trainable_share": 0.1,
               "steps": 3, "trained_tokens": 400, "tokens_per_second": 100.0, "train_seconds": 3.0, "wall_seconds": 4.0,
               "peak_memory_mb": 100.0, "train_examples": 8, "device": "cpu", "threads": 1}
    console = Console(record=True, width=300)
    print_run_report(console, tmp_path, summary)
    printed = console.export_text()
    assert "worse than the base: the eval loss rose from 3.0097 to 9.1312" in printed
    assert "Lower train.lr (prefix_tuning usually trains at 0.0001 to 0.01)" in printed
    write_model_card(tmp_path, recipe_from_dict(tiny_recipe), summary)
    assert "Warning: the eval loss rose from 3.0097 to 9.1312" in (tmp_path / "README.md").read_text()
    for after in (3.03, 2.5, None):
        assert eval_loss_rose({**summary, "eval_loss_after": after}) is None
    assert eval_loss_rose({**summary, "eval_loss_before": None}) is None
    assert eval_loss_rose({**summary, "task": "sequence_classification"}) is None  # "before": a random head


def test_prefix_tuning_without_its_projection_is_warned_about_outside_deepspeed(tiny_recipe, caplog):
    """peft's default (the prefix trained directly) ruined SmolLM2 in three steps at lr 1e-3, without a word. The
    default stays (projection checkpoints cannot be trained from under DeepSpeed); the advice is said instead."""
    import logging

    from peftkit.config.validate import validate_recipe
    from peftkit.utils.once import command_scope

    def recipe(adapter=None, **extra):
        return recipe_from_dict({**tiny_recipe, "adapter": {"method": "prefix_tuning", "num_virtual_tokens": 4,
                                                            **(adapter or {})}, **extra})

    assert recipe().adapter.prefix_projection is False
    for case, warned in ((recipe(), True), (recipe({"prefix_projection": True}), False),
                         (recipe(deepspeed={"stage": 2}), False)):
        caplog.clear()
        with command_scope(), caplog.at_level(logging.WARNING, logger="peftkit"):
            validate_recipe(case, check_model=False)
        assert ("set `prefix_projection: true` with `encoder_hidden_size: 256`" in caplog.text) == warned, case


def test_replay_rows_that_all_fall_outside_max_seq_len_are_an_error(tiny_tokenizer, chat_file, tmp_path):
    from peftkit.config.schema import DataConfig

    long = write_jsonl(tmp_path / "long.jsonl", [{"question": "one two " * 100, "answer": "three"}] * 2)
    cfg = DataConfig(train=str(chat_file), eval_fraction=0, max_seq_len=32, replay={"path": str(long), "ratio": 1.0})
    with pytest.raises(DataError, match=r"data.replay: none of the 16 replay examples has a trained \(assistant\) token "
                                        r"left within data.max_seq_len=32 tokens"):
        build_datasets(cfg, tiny_tokenizer)


def test_an_unknown_built_in_replay_set_is_named_once(tiny_recipe):
    from peftkit.config.validate import validate_recipe

    data = {**tiny_recipe["data"], "replay": {"path": "builtin:generl", "ratio": 0.5}}
    with pytest.raises(ConfigError, match=r"^Invalid recipe: data\.replay\.path: there is no built-in replay set "
                                          r"'generl'; use `builtin:general` or a file$"):
        validate_recipe(recipe_from_dict({**tiny_recipe, "data": data}), check_model=False)
