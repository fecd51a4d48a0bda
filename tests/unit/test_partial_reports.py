"""Found by a new user's pass over partial / full fine-tuning: encoders as causal LMs, unfreezing counts, messages."""

from __future__ import annotations

import json

import pytest

from peftkit.config import recipe_from_dict
from peftkit.config.validate import validate_recipe
from peftkit.errors import ConfigError
from peftkit.train.run import train
from tests.unit.test_classification import _recipe, tiny_bert_dir  # noqa: F401 - the fixture


def test_an_encoder_is_refused_as_a_causal_lm_before_any_weights_load(tiny_recipe, tiny_bert_dir):
    """A local BERT folder passed `validate` for chat training, then crashed in the shared-prefix forward; with that
    off it trained a "causal LM" whose attention saw the tokens it predicted."""
    recipe = {**tiny_recipe, "model": {"name": str(tiny_bert_dir)}, "adapter": {"method": "partial"}}
    with pytest.raises(ConfigError, match=r"is a bert encoder \(is_decoder: false\): its attention sees the whole "
                                          r"text.*Use `task: sequence_classification`") as info:
        validate_recipe(recipe_from_dict(recipe))
    assert len(info.value.problems) == 1
    decoder = tiny_bert_dir.parent / "bert-decoder"  # the same model with causal attention is a causal LM
    config = json.loads((tiny_bert_dir / "config.json").read_text())
    decoder.mkdir()
    for path in tiny_bert_dir.iterdir():
        (decoder / path.name).write_bytes(path.read_bytes())
    (decoder / "config.json").write_text(json.dumps({**config, "is_decoder": True}))
    validate_recipe(recipe_from_dict({**recipe, "model": {"name": str(decoder)}}))


def test_a_classifiers_gradual_unfreezing_reports_its_trainable_count_at_the_end(tiny_bert_dir, tmp_path):
    adapter = {"method": "partial", "train_last_layers": 2, "unfreeze_schedule": {"every_steps": 2, "start_layers": 0}}
    result = train(recipe_from_dict(_recipe(tiny_bert_dir, tmp_path, adapter, max_steps=5)))
    summary = result.summary
    assert summary["trainable_params_end"] > summary["trainable_params"]
    assert f"{summary['trainable_params_end']:,} at the end (gradual unfreezing)" in \
        (result.run_dir / "README.md").read_text()
    assert json.loads((result.run_dir / "summary.json").read_text())["trainable_params_end"] == \
        summary["trainable_params_end"]


def test_a_full_model_run_on_another_base_is_named_a_trained_model_not_an_adapter(tmp_path, tiny_model_dir):
    """`merge RUN --base OTHER` on a partial run said "the adapter ... was trained on None"."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftkit.errors import ExportError
    from peftkit.export.compat import AdapterInfo, check_adapter_matches_base

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"base_config": {"model_type": "llama", "hidden_size": 64,
                                                                  "num_hidden_layers": 2, "vocab_size": 400}}))
    config = AutoConfig.for_model("qwen2", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, vocab_size=400)
    import torch

    with torch.device("meta"):
        other = AutoModelForCausalLM.from_config(config)
    info = AdapterInfo(run / "model", {"peft_type": "FULL_MODEL", "method": "partial"})
    with pytest.raises(ExportError) as raised:
        check_adapter_matches_base(info, other, "/models/qwen2")
    message = str(raised.value)
    assert message.startswith(f"the trained model in {run / 'model'} does not fit the base model /models/qwen2")
    assert "None" not in message and "the trained model was trained on" in message
