"""Decision margins: how confidently the base model gives each correct general answer."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from peftkit.cli import main
from peftkit.config.load import recipe_from_dict
from peftkit.data.build import HeldoutItem
from peftkit.evaluate.generation import Reply
from peftkit.evaluate.margins import CONFIDENT_MARGIN, confidently_known, decision_margins
from peftkit.evaluate.run_eval import _confident_forgetting
from peftkit.train.run import train
from tests.conftest import write_jsonl


class BigramModel(torch.nn.Module):
    """Next-token logits that depend only on the current token: each step's margin can be set exactly."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(vocab_size, vocab_size))

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


def _question(text: str, fact: str) -> HeldoutItem:
    return HeldoutItem(({"role": "user", "content": text},), (fact,), None)


def test_margin_is_the_narrowest_lead_up_to_the_end_of_the_key_fact(tiny_tokenizer):
    from peftkit.data.chat import generation_prompt

    item = _question("what is the network?", "brightnet")
    reply_ids = tiny_tokenizer("the network is brightnet. hello", add_special_tokens=False)["input_ids"]
    assert len(set(reply_ids)) == len(reply_ids), "a bigram table needs distinct tokens"
    fact_end = next(k for k in range(1, len(reply_ids) + 1) if "brightnet" in tiny_tokenizer.decode(reply_ids[:k]))
    assert fact_end < len(reply_ids), "the reply must go on after the fact"
    prompt_ids = tiny_tokenizer(generation_prompt(tiny_tokenizer, item.messages, None), add_special_tokens=False)["input_ids"]
    model = BigramModel(len(tiny_tokenizer))
    leads = [2.0 + k for k in range(len(reply_ids))]
    leads[fact_end - 1] = 0.3  # the token that completes the fact: counts
    leads[fact_end] = 0.01  # a near-tie after the fact: does not decide the score
    with torch.no_grad():
        for previous, chosen, lead in zip([prompt_ids[-1], *reply_ids], reply_ids, leads):
            model.table[previous, chosen] = lead
    reply = Reply(tiny_tokenizer.decode(reply_ids), True, tuple(reply_ids))
    missing = Reply("the network is down.", True, tuple(tiny_tokenizer("the network is down.")["input_ids"]))
    margins = decision_margins(model, tiny_tokenizer, [item, item, item], [reply, missing, Reply("x", True)])
    assert margins[0] == pytest.approx(0.3, abs=1e-5)
    assert margins[1:] == [None, None], "no key fact (or no token ids): no margin"
    assert model.training, "the model is given back in the mode it had"
    assert confidently_known([0.3, None, math.log(2), 5.0]) == [2, 3]


def test_confident_forgetting_counts_only_questions_the_base_answers_confidently():
    before = {"general_margins": [1.0, 0.1, None, 2.0],
              "general_details": [{"correct": True}, {"correct": True}, {"correct": False}, {"correct": True}]}
    after = {"general_details": [{"correct": False}, {"correct": False}, {"correct": True}, {"correct": True}]}
    result = _confident_forgetting(before, after)
    # confident: questions 0 and 3; the tuned model lost question 0 -> half of them; question 1's loss is a near-tie's
    assert result == {"general_confident_questions": 2, "confident_margin_nats": round(CONFIDENT_MARGIN, 4),
                      "forgetting_confident_points": 50.0}
    assert [d["base_margin"] for d in after["general_details"]] == [1.0, 0.1, None, 2.0]
    assert [d["base_correct"] for d in after["general_details"]] == [True, True, False, True]
    assert _confident_forgetting({}, after)["forgetting_confident_points"] is None, "without a base measurement"


def test_eval_reports_forgetting_on_confidently_known_questions(tiny_recipe, tmp_path, capsys, monkeypatch):
    """The wiring: the base model's replies get margins, the tuned model's details carry them, and the report,
    the terminal and the model card give the forgetting over the confident questions."""
    from peftkit.evaluate import run_eval

    run_dir = train(recipe_from_dict({**tiny_recipe, "eval": {"before": False, "max_new_tokens": 6}})).run_dir
    general = write_jsonl(tmp_path / "general.jsonl", [{"question": f"q{i}", "key_fact": "paris"} for i in range(4)])
    real_answer_items = run_eval.answer_items
    calls = []

    def answers(model, tokenizer, items, **kwargs):  # the tuned model is asked first, then the base model
        if kwargs.get("label") != "general questions":
            return real_answer_items(model, tokenizer, items, **kwargs)
        calls.append(len(items))
        right = [True, True, False, True] if len(calls) == 2 else [False, False, True, True]
        return [Reply("paris" if ok else "rome", True, (5,)) for ok in right]

    margins_asked = []
    monkeypatch.setattr(run_eval, "answer_items", answers)
    monkeypatch.setattr(run_eval, "decision_margins", lambda model, tok, items, replies: margins_asked.append(
        [r.text for r in replies]) or [1.0, 0.1, None, 2.0])
    assert main(["eval", str(run_dir), "--general", str(general)]) == 0
    assert margins_asked == [["paris", "paris", "rome", "paris"]], "margins are measured on the base model's replies only"
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["forgetting_points"] == pytest.approx(25.0), "q0 and q1 lost, q2 gained: one of four net"
    assert report["general_confident_questions"] == 2 and report["forgetting_confident_points"] == 50.0
    details = report["details"]["general_details"]
    assert [d["base_margin"] for d in details] == [1.0, 0.1, None, 2.0]
    assert "lost 50.0 points on the 2 questions the base model answers confidently" in capsys.readouterr().out
    assert "On the 2 general questions the base model answers confidently" in (run_dir / "README.md").read_text()
    assert "general_margins" not in report["before"], "per-question margins live in the details"
