"""Recipe keys that were accepted and then crashed training or were ignored without a word (tester reports):
prefix tuning with gradient checkpointing, virtual tokens past a learned position table, 4-bit keys with 8-bit
quantization, chat keys with a classifier, speed options turned off, DeepSpeed block keys a stage drops."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from peftkit.config import recipe_from_dict
from peftkit.config.load import recipe_to_yaml
from peftkit.config.validate import validate_recipe
from peftkit.errors import ConfigError


def _with(tiny_recipe: dict[str, Any], section: str, **values: Any) -> dict[str, Any]:
    data = copy.deepcopy(tiny_recipe)
    data[section] = {**data.get(section, {}), **values}
    return data


def _refusal(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        validate_recipe(recipe_from_dict(data), check_model=True)
    return "\n".join(info.value.problems)


# 1. prefix tuning + gradient checkpointing


def test_prefix_tuning_with_gradient_checkpointing_is_refused_before_any_model_loads(tiny_recipe):
    recipe = _with(tiny_recipe, "train", gradient_checkpointing=True)
    recipe["adapter"] = {"method": "prefix_tuning", "num_virtual_tokens": 4}
    with pytest.raises(ConfigError, match="train.gradient_checkpointing recomputes each layer") as info:
        recipe_from_dict(recipe)
    assert "remove train.gradient_checkpointing" in str(info.value)
    recipe["adapter"] = {"method": "prompt_tuning", "num_virtual_tokens": 4}  # its virtual tokens are inputs: it trains
    assert recipe_from_dict(recipe).train.gradient_checkpointing


# 2. virtual tokens and the model's positions


@pytest.fixture
def gpt2_dir(tmp_path: Path) -> Path:
    """A GPT-2 with a learned 64-position table (wpe) and the tiny tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.conftest import build_tiny_tokenizer

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=16, n_layer=1, n_head=2, vocab_size=400)).save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_virtual_tokens_count_against_a_learned_position_table(tiny_recipe, gpt2_dir, method):
    recipe = _with(tiny_recipe, "model", name=str(gpt2_dir))
    recipe["adapter"] = {"method": method, "num_virtual_tokens": 8}
    problems = _refusal(recipe)  # max_seq_len 64 + 8 virtual tokens: wpe indexed past its 64 rows
    assert (f"data.max_seq_len: 64 tokens after {method}'s 8 virtual tokens do not fit" in problems
            and "learned positions for 64" in problems and "set data.max_seq_len to 56 or less" in problems), problems
    recipe["data"]["max_seq_len"] = 56
    validate_recipe(recipe_from_dict(recipe))
    del recipe["data"]["max_seq_len"]  # the schema's default is fitted instead
    fitted = validate_recipe(recipe_from_dict(recipe))
    assert fitted.data.max_seq_len == 56


def test_validate_tokenizes_at_the_fitted_length(tiny_recipe, gpt2_dir, tmp_path, capsys):
    """`peftkit validate` threw the fitted recipe away: its Data line cut rows at the default 1024, not at 56."""
    from peftkit.cli import main

    recipe = _with(tiny_recipe, "model", name=str(gpt2_dir))
    recipe["adapter"] = {"method": "prompt_tuning", "num_virtual_tokens": 8}
    long = [{"messages": [{"role": "user", "content": "tell me " * 5 + str(i)},
                          {"role": "assistant", "content": "one two three four " * 20}]} for i in range(12)]
    (tmp_path / "long.jsonl").write_text("".join(f"{json.dumps(r)}\n" for r in long))
    recipe["data"] = {"train": str(tmp_path / "long.jsonl"), "eval_fraction": 0.25}
    path = tmp_path / "gpt2.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "max_seq_len=56" in out and "1024" not in out, out


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_a_fitted_length_really_runs_through_the_position_table(gpt2_dir, method):
    """The numbers above are the model's: 56 tokens after 8 virtual ones run, 57 index past wpe."""
    from transformers import AutoModelForCausalLM

    from peftkit.adapters import build_adapter
    from peftkit.config.schema import PrefixTuningAdapterConfig, PromptTuningAdapterConfig

    cfg_class = PromptTuningAdapterConfig if method == "prompt_tuning" else PrefixTuningAdapterConfig
    model = build_adapter(AutoModelForCausalLM.from_pretrained(gpt2_dir), cfg_class(num_virtual_tokens=8))
    model(input_ids=torch.ones(1, 56, dtype=torch.long))
    with pytest.raises(IndexError):
        model(input_ids=torch.ones(1, 57, dtype=torch.long))


def test_prefix_longer_than_the_position_table_is_an_adapter_problem(tiny_recipe, gpt2_dir):
    recipe = _with(tiny_recipe, "model", name=str(gpt2_dir))
    recipe["adapter"] = {"method": "prefix_tuning", "num_virtual_tokens": 64}
    problems = _refusal(recipe)
    assert "adapter.num_virtual_tokens (64) must be below the model's 64 learned positions" in problems, problems
    assert "data.max_seq_len" not in problems  # one message for one cause


def test_virtual_tokens_past_a_rope_context_are_a_warning(tiny_recipe, caplog):
    context = 256  # the tiny Llama's max_position_embeddings (RoPE: runs past it, untrained)
    recipe = _with(tiny_recipe, "data", max_seq_len=context - 4)
    recipe["adapter"] = {"method": "prompt_tuning", "num_virtual_tokens": 8}
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        validate_recipe(recipe_from_dict(recipe))
    assert (f"data.max_seq_len {context - 4} after prompt_tuning's 8 virtual tokens is longer than the {context}-token "
            f"context" in caplog.text and f"set data.max_seq_len to {context - 8} or less" in caplog.text), caplog.text
    caplog.clear()
    del recipe["data"]["max_seq_len"]  # the user set nothing: the warning says the value is the default
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        validate_recipe(recipe_from_dict(recipe))
    assert "data.max_seq_len 1024 (the default) after prompt_tuning's 8 virtual tokens is longer" in caplog.text


# 3. 8-bit quantization and the 4-bit-only keys


@pytest.mark.parametrize("key, value", [("quant_type", "fp4"), ("double_quant", False), ("compute_dtype", "bfloat16")])
def test_four_bit_keys_with_8_bits_are_refused(tiny_recipe, key, value):
    recipe = {**tiny_recipe, "quantization": {"bits": 8, key: value}}
    with pytest.raises(ConfigError, match=f"{key} applies to 4-bit quantization only") as info:
        recipe_from_dict(recipe)
    assert "remove it, or set bits: 4" in str(info.value)
    recipe_from_dict({**tiny_recipe, "quantization": {"bits": 4, key: value}})


def test_an_8_bit_record_names_what_was_used_and_reloads(tiny_recipe):
    from peftkit.config.schema import QuantizationConfig
    from peftkit.train.model_card import _quantization_text

    # the 4-bit keys at their defaults (a recipe.yaml written by an earlier version) still load
    recipe = recipe_from_dict({**tiny_recipe, "quantization": {"bits": 8, "quant_type": "nf4", "double_quant": True,
                                                               "compute_dtype": "auto", "blocksize": 64}})
    assert recipe.quantization is not None
    assert recipe.quantization.model_dump() == {"bits": 8, "keep_modules": None}  # summary.json's record
    stored = yaml.safe_load(recipe_to_yaml(recipe))["quantization"]
    assert "quant_type" not in stored and recipe_from_dict({**tiny_recipe, "quantization": stored}) == recipe
    assert _quantization_text(recipe.quantization.model_dump()) == "8-bit (LLM.int8)"
    assert _quantization_text({"bits": 8, "quant_type": "fp4"}) == "8-bit (LLM.int8)"  # an older summary
    assert _quantization_text(QuantizationConfig(quant_type="fp4").model_dump()) == "4-bit fp4"


# 4. chat-only keys with a classifier


@pytest.mark.parametrize("section, key, value", [
    ("data", "system_prompt", "You are a sentiment classifier."), ("data", "replay", {"ratio": 1.0}),
    ("data", "format", "chat"), ("model", "chat_template", "chatml")])
def test_chat_keys_are_refused_for_a_classifier(tiny_recipe, section, key, value):
    recipe = {**_with(tiny_recipe, section, **{key: value}), "task": "sequence_classification"}
    with pytest.raises(ConfigError, match=f"{section}.{key} is for chat training") as info:
        recipe_from_dict(recipe)
    assert "a classifier reads each record's plain text" in str(info.value) and "remove it" in str(info.value)
    recipe_from_dict({**recipe, "task": "causal_lm"})


def test_a_classifiers_own_recipe_yaml_still_loads(tiny_recipe):
    recipe = recipe_from_dict({**tiny_recipe, "task": "sequence_classification"})
    assert recipe_from_dict(yaml.safe_load(recipe_to_yaml(recipe))) == recipe


# 5. speed options switched off, DeepSpeed keys a stage drops


@pytest.mark.parametrize("overrides, expected", [
    ({"neftune_noise_alpha": 5.0}, "train.share_prompt_prefix and train.bucket_within_batch are off for this run"),
    ({"gradient_checkpointing": True}, "train.share_prompt_prefix is off for this run"),
    ({"neftune_noise_alpha": 5.0, "share_prompt_prefix": False}, "train.bucket_within_batch is off for this run"),
    ({}, None)])
def test_speed_options_turned_off_are_said_once(tiny_recipe, tiny_model_dir, tmp_path, caplog, overrides, expected):
    from transformers import AutoModelForCausalLM

    from peftkit.adapters import build_adapter
    from peftkit.train.run import training_arguments
    from peftkit.train.trainer import SFTTrainer

    recipe = recipe_from_dict(_with(tiny_recipe, "train", **overrides))
    model = build_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), recipe.adapter)
    args = training_arguments(recipe, tmp_path, "cpu", torch.float32, False)
    with caplog.at_level(logging.INFO, logger="peftkit"):
        SFTTrainer(model=model, args=args, train_dataset=[{"input_ids": [1, 2], "labels": [1, 2]}],
                   share_prompt_prefix=recipe.train.share_prompt_prefix,
                   bucket_within_batch=recipe.train.bucket_within_batch)
    lines = [r.getMessage() for r in caplog.records if "off for this run" in r.getMessage()]
    if expected is None:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith(expected), lines
        reason = "NEFTune's noise" if "neftune_noise_alpha" in overrides else "gradient checkpointing"
        assert reason in lines[0]


def test_deepspeed_block_keys_the_stage_would_drop_are_refused(tiny_recipe):
    from peftkit.train import deepspeed as ds

    stage0 = recipe_from_dict({**tiny_recipe, "deepspeed": {"stage": 0, "contiguous_gradients": False,
                                                           "reduce_bucket_size": 1000}})
    assert ("deepspeed.contiguous_gradients and deepspeed.reduce_bucket_size tune ZeRO's gradient reduction"
            in "\n".join(ds.check_deepspeed(stage0, device="cpu")))
    stage2 = recipe_from_dict({**tiny_recipe, "deepspeed": {"stage": 2, "gather_weights_on_save": False}})
    assert "deepspeed.gather_weights_on_save: false applies to stage 3 only" in "\n".join(
        ds.check_deepspeed(stage2, device="cpu"))
    for plain in ({"stage": 0}, {"stage": 2}, {"stage": 3, "gather_weights_on_save": False}):
        problems = ds.check_deepspeed(recipe_from_dict({**tiny_recipe, "deepspeed": plain}), device="cpu")
        assert not [p for p in problems if "stage 0 is plain" in p or "applies to stage 3 only" in p], problems


def test_stage_3_without_gathering_warns_as_a_json_config_does(tiny_recipe, caplog):
    from peftkit.train import deepspeed as ds

    recipe = recipe_from_dict({**tiny_recipe, "deepspeed": {"stage": 3, "gather_weights_on_save": False}})
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        config = ds.generate_config(recipe.deepspeed, recipe, "cpu", torch.float32)  # type: ignore[arg-type]
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is False
    assert "deepspeed.gather_weights_on_save is false, so intermediate checkpoints hold no usable adapter" in caplog.text
