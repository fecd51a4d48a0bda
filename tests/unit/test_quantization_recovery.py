"""Quantization recovery: KL to the full-precision base at the prompt positions of the training rows."""

from __future__ import annotations

import pytest
import torch

from peftkit.adapters import check_recipe_adapter
from peftkit.config import recipe_from_dict
from peftkit.data.build import PaddingCollator, tokenize_examples
from peftkit.data.formats import load_examples
from peftkit.train.recovery import (RECOVERY_IDS, RECOVERY_MASK, RECOVERY_PROBS, add_recovery_targets,
                                    prompt_positions)
from peftkit.train.run import train
from peftkit.train.trainer import SFTTrainer


def _rows(tokenizer, chat_file, n=3):
    rows, _ = tokenize_examples(load_examples(chat_file), tokenizer, 64, None)
    return rows[:n]


def _trainer(model, tmp_path, weight=1.0, **kwargs):
    from transformers import TrainingArguments

    return SFTTrainer(model=model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True),
                      share_prompt_prefix=False, recovery_weight=weight, **kwargs)


def test_targets_are_the_models_top_k_at_the_prompt_positions(tiny_model_dir, tiny_tokenizer, chat_file):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    row = add_recovery_targets(model, tiny_tokenizer.pad_token_id, _rows(tiny_tokenizer, chat_file), top_k=5)[1]
    positions = prompt_positions(row["labels"])
    labels = torch.tensor(row["labels"])
    assert 0 < len(positions) < len(labels) - 1
    assert (labels[positions + 1] == -100).all(), "only positions whose next token is unsupervised"
    assert row[RECOVERY_IDS].shape == (len(positions), 5) and row[RECOVERY_IDS].dtype == torch.int32
    assert torch.allclose(row[RECOVERY_PROBS].float().sum(-1), torch.ones(len(positions)), atol=2e-3)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
    assert row[RECOVERY_IDS][:, 0].tolist() == logits[positions].argmax(-1).tolist()


@pytest.mark.parametrize("sparse", [True, False])
def test_loss_adds_the_kl_at_prompt_positions_only(tiny_model_dir, tiny_tokenizer, chat_file, tmp_path, sparse):
    """Targets from the model itself: KL ~0, the loss is the plain one. Targets from another model: the loss
    grows by exactly weight x KL / answer tokens, and the same with the batch split into length buckets."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    other = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rows = _rows(tiny_tokenizer, chat_file)
    collate = PaddingCollator(tiny_tokenizer.pad_token_id)
    trainer = _trainer(model, tmp_path, weight=0.5, supervised_logits_only=sparse, bucket_within_batch=False)
    model.eval()
    plain = trainer.compute_loss(model, collate(rows)).item()
    whole_vocab = model.config.vocab_size  # the tiny random model spreads its mass: keep all of it
    own = collate(add_recovery_targets(model, tiny_tokenizer.pad_token_id, rows, top_k=whole_vocab))
    assert own[RECOVERY_MASK].sum() == own[RECOVERY_IDS].shape[0]
    assert trainer.compute_loss(model, own).item() == pytest.approx(plain, abs=1e-3)

    foreign = collate(add_recovery_targets(other, tiny_tokenizer.pad_token_id, rows))
    with torch.no_grad():
        logits = model(input_ids=foreign["input_ids"], attention_mask=foreign["attention_mask"]).logits[foreign[RECOVERY_MASK]]
        log_q = torch.log_softmax(logits, -1).gather(1, foreign[RECOVERY_IDS])
        probs = foreign[RECOVERY_PROBS]
        kl = (probs * (probs.log() - log_q)).sum().item()
    answer_tokens = int((foreign["labels"][:, 1:] != -100).sum())
    assert kl > 0.1
    assert trainer.compute_loss(model, foreign).item() == pytest.approx(plain + 0.5 * kl / answer_tokens, rel=1e-4)
    bucketed = _trainer(model, tmp_path, weight=0.5, supervised_logits_only=sparse, bucket_within_batch=True)
    assert bucketed.compute_loss(model, dict(foreign)).item() == pytest.approx(plain + 0.5 * kl / answer_tokens, rel=1e-4)


def test_rows_without_targets_add_nothing(tiny_model_dir, tiny_tokenizer, chat_file, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    rows = _rows(tiny_tokenizer, chat_file)
    collate = PaddingCollator(tiny_tokenizer.pad_token_id)
    mixed = collate([add_recovery_targets(model, tiny_tokenizer.pad_token_id, rows[:1])[0], *rows[1:]])
    assert mixed[RECOVERY_MASK][0].any() and not mixed[RECOVERY_MASK][1:].any()
    assert mixed[RECOVERY_IDS].shape[0] == int(mixed[RECOVERY_MASK].sum())


def test_recover_is_for_chat_training_only(tiny_recipe):
    recipe = recipe_from_dict({**tiny_recipe, "task": "sequence_classification",
                               "adapter": {"method": "lora"}, "quantization": {"recover": True}})
    assert any(p.startswith("quantization.recover: only for causal_lm") for p in check_recipe_adapter(recipe))


def test_training_with_recovery_uses_the_full_precision_base(tiny_recipe, tmp_path, monkeypatch):
    """The targets come from the unquantized model; training then runs on the 4-bit one."""
    from peftkit.train import run as run_module

    seen = []
    real_targets, real_load = run_module.add_recovery_targets, run_module.load_model
    monkeypatch.setattr(run_module, "add_recovery_targets", lambda model, pad, rows: (
        seen.append(("targets", getattr(model.config, "quantization_config", None), len(rows)))
        or real_targets(model, pad, rows)))
    monkeypatch.setattr(run_module, "load_model", lambda cfg, quantization, **kw: (
        seen.append(("load", quantization and quantization.bits, None)) or real_load(cfg, quantization, **kw)))
    recipe = recipe_from_dict({**tiny_recipe, "adapter": {**tiny_recipe["adapter"], "method": "qlora"},
                               "quantization": {"recover": True}, "train": {**tiny_recipe["train"], "max_steps": 2},
                               "eval": {"before": False}})
    summary = train(recipe).summary
    assert [s[:2] for s in seen] == [("load", None), ("targets", None), ("load", 4)]
    assert seen[1][2] == summary["data_stats"]["train_rows"]
    assert summary["train_loss"] > 0
