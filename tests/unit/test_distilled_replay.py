"""Distilled replay: the base model's top-k distribution as soft targets for replay rows."""

from __future__ import annotations

import pytest
import torch

from peftkit.config import recipe_from_dict
from peftkit.data.build import PaddingCollator, tokenize_examples
from peftkit.data.formats import load_examples
from peftkit.train.distill import TEACHER_IDS, TEACHER_PROBS, add_teacher_targets, supervised_targets
from peftkit.train.run import train
from peftkit.train.trainer import SFTTrainer
from tests.conftest import write_jsonl


def _rows(tokenizer, chat_file):
    rows, _ = tokenize_examples(load_examples(chat_file), tokenizer, 64, None)
    return rows[:3]


def test_teacher_targets_are_the_base_models_top_k(tiny_model_dir, tiny_tokenizer, chat_file):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    rows = _rows(tiny_tokenizer, chat_file)
    taught = add_teacher_targets(model, tiny_tokenizer.pad_token_id, rows, top_k=5)
    row = taught[0]
    n = len(supervised_targets(row["labels"]))
    assert n > 0 and len(row[TEACHER_IDS]) == n and all(len(ids) == 5 for ids in row[TEACHER_IDS])
    assert all(abs(sum(p) - 1) < 1e-5 and p == sorted(p, reverse=True) for p in row[TEACHER_PROBS])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
    keep = torch.tensor(row["labels"][1:]) != -100
    assert [ids[0] for ids in row[TEACHER_IDS]] == logits[keep].argmax(-1).tolist()


def test_one_hot_teacher_rows_give_the_plain_cross_entropy(tiny_model_dir, tiny_tokenizer, chat_file, tmp_path):
    """A batch mixing a distilled row with plain rows: plain rows train on their own tokens, exactly."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    rows = _rows(tiny_tokenizer, chat_file)
    collate = PaddingCollator(tiny_tokenizer.pad_token_id)
    trainer = SFTTrainer(model=model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True),
                         data_collator=collate, share_prompt_prefix=False)
    plain = trainer.compute_loss(model, collate(rows)).item()
    fake_teacher = {TEACHER_IDS: [[t, 1, 2] for t in supervised_targets(rows[0]["labels"])],
                    TEACHER_PROBS: [[1.0, 0.0, 0.0]] * len(supervised_targets(rows[0]["labels"]))}
    mixed = collate([{**rows[0], **fake_teacher}, *rows[1:]])
    assert mixed[TEACHER_IDS].shape[1] == 3
    assert trainer.compute_loss(model, mixed).item() == pytest.approx(plain, rel=1e-6)
    soft = {TEACHER_IDS: fake_teacher[TEACHER_IDS], TEACHER_PROBS: [[0.5, 0.25, 0.25]] * len(fake_teacher[TEACHER_PROBS])}
    assert trainer.compute_loss(model, collate([{**rows[0], **soft}, *rows[1:]])).item() != plain


def test_training_with_distilled_replay(tiny_recipe, tmp_path, monkeypatch):
    from peftkit.train import run as run_module

    taught = []
    real = run_module.add_teacher_targets
    monkeypatch.setattr(run_module, "add_teacher_targets", lambda model, pad, rows: taught.extend(rows) or real(model, pad, rows))
    replay = write_jsonl(tmp_path / "replay.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"},
                                                                   {"role": "assistant", "content": "a b c d"}]} for i in range(4)])
    recipe = recipe_from_dict({**tiny_recipe, "data": {**tiny_recipe["data"], "replay": {"path": str(replay), "ratio": 0.5,
                                                                                         "distill": True}},
                               "train": {**tiny_recipe["train"], "max_steps": 2}, "eval": {"before": False}})
    result = train(recipe)
    summary = result.summary
    assert summary["data_stats"]["replay_examples"] == 6
    assert summary["train_loss"] > 0 and summary["trained_tokens"] > 0
    assert len(taught) == 6, "the replay rows, and only they, get teacher targets"
    card = (result.run_dir / "README.md").read_text()
    assert f"| replay (in the examples) | `{replay}`, 6 rows, answers as written, distilled (top-20) |" in card

