"""The chat REPL and one-shot mode on a tiny trained run."""

from __future__ import annotations

import io

from peftkit.config import recipe_from_dict
from peftkit.runs import load_run
from peftkit.serve.chat import chat
from peftkit.train.run import train


def test_repl_keeps_history_resets_and_exits(tiny_recipe):
    run_dir = train(recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 1}, "eval": {"before": False}})).run_dir
    run = load_run(run_dir)
    stdin = io.StringIO("hello\nwhat is the network?\n/reset\nwho is the head librarian?\n/exit\n")
    out = io.StringIO()
    history = chat(run.model, run.tokenizer, system_prompt="be brief", max_new_tokens=5, stdin=stdin, out=out)
    assert [m["role"] for m in history] == ["system", "user", "assistant"], "history restarts after /reset"
    assert history[1]["content"] == "who is the head librarian?"
    assert out.getvalue().count("bot> ") == 3


def test_one_shot_prompt(tiny_recipe):
    run_dir = train(recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 1}, "eval": {"before": False}})).run_dir
    run = load_run(run_dir)
    out = io.StringIO()
    history = chat(run.model, run.tokenizer, system_prompt=None, prompt="hello", max_new_tokens=4, out=out)
    assert history[-1]["role"] == "assistant"
    assert out.getvalue().strip() == history[-1]["content"]
