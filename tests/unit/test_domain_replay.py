"""Replay prompts built from the domain's vocabulary (`data.replay.domain_prompts`)."""

from __future__ import annotations

import pytest

from peftkit.config import recipe_from_dict
from peftkit.data.build import build_datasets
from peftkit.data.domain_replay import TEMPLATES, domain_vocabulary_prompts, domain_words
from peftkit.data.formats import Example
from peftkit.errors import ConfigError


def chat(user: str, answer: str = "ok") -> Example:
    return Example("t", messages=({"role": "system", "content": "printer printer printer"},
                                  {"role": "user", "content": user}, {"role": "assistant", "content": answer}))


def test_domain_words_rank_user_words_by_conversations():
    examples = [
        chat("When does the Brightwater library open on Sunday?", "The library opens at noon, library library."),
        chat("Is the library open late?"),
        chat("What are the opening hours of the library?"),
        chat("Can I renew a loan online? What about the loan limit?"),
        chat("How much does a replacement card cost?"),
    ]
    words = domain_words(examples, 3)
    # "library": in four conversations' user turns; "loan" twice in one conversation counts once, like
    # every other word; "Brightwater" / "Sunday" are names, "does" / "what" stopwords; the system prompt's
    # and the answers' words are not the user's.
    assert words[0] == "library"
    assert "loan" in domain_words(examples, 20) and "printer" not in domain_words(examples, 20)
    assert not {"brightwater", "Brightwater", "sunday", "does", "what", "the"} & set(domain_words(examples, 50))
    assert len(words) == 3 and words == domain_words(list(reversed(examples)), 3), "ties are broken by the word"


def test_domain_vocabulary_prompts_cycle_the_templates():
    examples = [chat(f"Where is the {w} for the {v}?") for w in ("scanner", "printer") for v in ("room", "desk", "hall")]
    prompts = domain_vocabulary_prompts(examples, 5)
    assert len(prompts) == 5
    texts = [p.messages[0]["content"] for p in prompts]
    assert texts[:3] == [t.format(word="printer") for t in TEMPLATES] or texts[:3] == [t.format(word="scanner") for t in TEMPLATES]
    assert all(p.messages[-1] == {"role": "assistant", "content": ""} for p in prompts), "left for the base model"
    assert all(p.messages[0]["role"] == "user" for p in prompts), "no system prompt: general use"
    assert domain_vocabulary_prompts(examples, 0) == []


def test_domain_prompts_need_the_base_models_answers(tiny_recipe, tmp_path):
    data = tiny_recipe["data"]
    with pytest.raises(ConfigError, match="domain_prompts"):
        recipe_from_dict({**tiny_recipe, "data": {**data, "replay": {"path": "builtin:general", "answers": "dataset",
                                                                     "domain_prompts": 6}}})


def test_domain_prompts_are_answered_and_added_to_replay(tiny_recipe):
    from peftkit.models import load_tokenizer, resolve_model_ref

    recipe = recipe_from_dict({**tiny_recipe, "data": {**tiny_recipe["data"], "max_seq_len": 512,
                                                       "replay": {"path": "builtin:general", "ratio": 0.5, "domain_prompts": 4}}})
    tokenizer = load_tokenizer(recipe.model, resolve_model_ref(recipe.model.name))
    asked: list[Example] = []

    def answerer(examples: list[Example]) -> list[Example]:
        asked.extend(examples)
        return [Example(e.where, messages=(*e.messages[:-1], {"role": "assistant", "content": "a general answer"}))
                for e in examples]

    bundle = build_datasets(recipe.data, tokenizer, recipe.train.seed, replay_answerer=answerer)
    n_train = bundle.stats["train_examples"]
    vocabulary = [e for e in asked if e.where.startswith("domain vocabulary")]
    assert len(vocabulary) == 4 and len(asked) == round(0.5 * n_train) + 4
    assert bundle.stats["replay_examples"] == len(asked)
    decoded = [tokenizer.decode(r["input_ids"]) for r in bundle.train[-4:]]
    for example, text in zip(vocabulary, decoded):
        assert example.messages[0]["content"] in text and "a general answer" in text
