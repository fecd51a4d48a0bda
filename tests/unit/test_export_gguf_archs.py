"""GGUF export of GPT-2, StarCoder2 and StableLM: read back by transformers and run in llama.cpp itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.unit.export_fixtures import export_recipe, llama64_dir, make_run, save_with_random_weights  # noqa: F401
from tests.unit.test_export_gguf import _fields
from peftkit.errors import ExportError
from peftkit.export.gguf_lora import export_gguf_adapter
from peftkit.export.gguf_writer import check_architecture, export_gguf, write_model_gguf

torch.set_num_threads(1)

FAMILIES = {
    # GPT-2: Conv1D weights (in, out), learned positions, LayerNorm with bias, tied head
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    # StarCoder2: LayerNorm and biases everywhere, plain GELU MLP (c_fc / c_proj), grouped KV heads
    "starcoder2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, rope_parameters={"rope_type": "default",
                                                                                           "rope_theta": 50000.0}),
    # StableLM: RoPE on part of each head (half here, not the class default of a quarter), q/k/v biases, untied head
    "stablelm": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256, use_qkv_bias=True, partial_rotary_factor=0.5),
}


def _config(model_type: str, tokenizer: Any, **extra: Any) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                **{**FAMILIES[model_type], **extra})


def _family_dir(path: Path, model_type: str, **extra: Any) -> Path:
    """A tiny random model of the family (hidden 64, two layers), weights large enough to move the logits."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    return save_with_random_weights(AutoModelForCausalLM.from_config(_config(model_type, tokenizer, **extra)),
                                    tokenizer, path)


def _lora() -> Any:
    """A fresh config per run: peft sets `fan_in_fan_out` on the config it wraps GPT-2's Conv1D layers with."""
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")


def _report(result: Any) -> dict[str, Any]:
    return json.loads((result.path / "verification.json").read_text())


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_a_new_family_exports_to_gguf_that_transformers_and_llama_cpp_run_as_merged(export_recipe, tmp_path,
                                                                                       model_type):
    run = make_run(tmp_path / "run", {**export_recipe, "name": model_type}, _lora(),
                   model_dir=_family_dir(tmp_path / model_type, model_type))
    for gguf_type, bound in (("f32", 1e-4), ("f16", None)):
        result = export_gguf(run, tmp_path / gguf_type, gguf_type=gguf_type)
        report = _report(result)
        assert report["passed"] and report["greedy_exact"] == 1.0, report
        assert bound is None or report["max_abs_diff"] < bound, report
        assert report["llama_cpp"]["ran"] and report["llama_cpp"]["passed"], report["llama_cpp"]
    fields, reader = _fields(tmp_path / "f32" / f"{model_type}-f32.gguf")
    assert fields["general.architecture"] == model_type
    assert f"{model_type}.attention.layer_norm_epsilon" in fields
    tensors = {t.name: t for t in reader.tensors}
    assert ("position_embd.weight" in tensors) == (model_type == "gpt2")
    assert ("output.weight" in tensors) == (model_type == "stablelm")  # GPT-2 and StarCoder2 tie their heads
    assert "blk.0.attn_norm.bias" in tensors and "output_norm.bias" in tensors
    if model_type == "stablelm":  # llama.cpp turns the first rope.dimension_count dims of each 16-dim head
        assert fields["stablelm.rope.dimension_count"] == 8 and "blk.0.attn_q.bias" in tensors
    if model_type == "starcoder2":
        assert fields["starcoder2.rope.freq_base"] == pytest.approx(50000.0)
    if model_type == "gpt2":  # Conv1D (in, out) weights go into the file as (out, in): ggml's shape is (in, out)
        from peftkit.export.merge import merge_run

        merged = merge_run(run).model.state_dict()
        qkv = tensors["blk.0.attn_qkv.weight"]
        assert [int(n) for n in qkv.shape] == [64, 192]
        np.testing.assert_array_equal(np.array(qkv.data), merged["transformer.h.0.attn.c_attn.weight"].numpy().T)
        assert "gpt2.rope.freq_base" not in fields

    lora = _report(export_gguf_adapter(run, gguf_type="f32"))  # the reconstruction transposes GPT-2's deltas back
    assert lora["passed"] and lora["max_abs_diff"] < 1e-4, lora


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_a_new_familys_gguf_lora_runs_in_llama_cpp_on_the_gguf_it_was_trained_from(export_recipe, tmp_path,
                                                                                   model_type, monkeypatch):
    """Trained from a GGUF base (converted back through `gguf_config`: GPT-2's 256 positions, StarCoder2's RoPE base,
    StableLM's rotary share, which transformers' reader leaves at their defaults), the GGUF LoRA runs in llama.cpp."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path / "home"))  # a conversion of its own, not one cached before

    model_dir = _family_dir(tmp_path / model_type, model_type)
    base = tmp_path / f"{model_type}-base.gguf"
    write_model_gguf(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                     AutoTokenizer.from_pretrained(model_dir), base, gguf_type="f32", name="base")
    run = make_run(tmp_path / "run", {**export_recipe, "name": "desk"}, _lora(), model_dir=base)
    report = _report(export_gguf_adapter(run, gguf_type="f32"))
    assert report["passed"] and report["max_abs_diff"] < 1e-4, report
    assert report["llama_cpp"]["ran"] and report["llama_cpp"]["passed"], report["llama_cpp"]
    assert report["llama_cpp"]["greedy_exact"] == 1.0


def test_a_q8_0_gpt2_file_holds_its_conv1d_weights_rounded_along_the_files_rows(export_recipe, tmp_path):
    """The quantized file is checked against the merged model rounded as the file stores it: for GPT-2's transposed
    weights that rounding must run along the file's rows, or the check fails a correct file."""
    run = make_run(tmp_path / "run", {**export_recipe, "name": "g"}, _lora(), model_dir=_family_dir(tmp_path / "gpt2", "gpt2"))
    report = _report(export_gguf(run, gguf_type="q8_0"))
    assert report["passed"] and report["precision"] == "gguf-f32", report
    assert report["llama_cpp"]["passed"], report["llama_cpp"]
    types = {t.name: t.tensor_type.name for t in _fields(run / "gguf" / "g-q8_0.gguf")[1].tensors}
    assert types["blk.0.ffn_up.weight"] == "Q8_0" and types["position_embd.weight"] == "F32"


def test_a_lora_trained_on_gpt2_merges_and_exports(export_recipe, tmp_path):
    """peftkit's own training on GPT-2 (Conv1D c_attn / c_proj / c_fc, which peft adapts with fan_in_fan_out), then
    the merged GGUF: the merge must reproduce the adapter before the file is written and run."""
    from peftkit.config import recipe_from_dict
    from peftkit.train.run import train

    recipe = {**export_recipe, "name": "g", "model": {"name": str(_family_dir(tmp_path / "gpt2", "gpt2"))},
              "adapter": {**export_recipe["adapter"], "target_modules": ["c_attn", "c_proj", "c_fc"]},
              "train": {**export_recipe["train"], "max_steps": 2}, "eval": {**export_recipe["eval"], "before": False},
              "output_dir": str(tmp_path / "run")}
    run = train(recipe_from_dict(recipe)).run_dir
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["fan_in_fan_out"] and set(adapter["target_modules"]) == {"c_attn", "c_proj", "c_fc"}
    report = _report(export_gguf(run, gguf_type="f32"))
    assert report["passed"] and report["merge"]["passed"] and report["llama_cpp"]["passed"], report


def test_what_llama_cpp_fixes_for_the_new_families_is_checked_before_any_export(tiny_tokenizer):
    assert check_architecture(_config("gpt2", tiny_tokenizer)).arch == "GPT2"
    assert check_architecture(_config("stablelm", tiny_tokenizer)).rope == "partial"  # half of each head
    refused = [
        (_config("gpt2", tiny_tokenizer, activation_function="gelu"), r"computes gelu_new / gelu_pytorch_tanh"),
        (_config("gpt2", tiny_tokenizer, scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        (_config("stablelm", tiny_tokenizer, qk_layernorm=True), "qk_layernorm"),
        (_config("stablelm", tiny_tokenizer, hidden_act="gelu"), r"computes silu"),
        (_config("starcoder2", tiny_tokenizer, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                 "rope_theta": 1e4}), "writes default RoPE, not `linear` scaling, for starcoder2"),
    ]
    for config, message in refused:
        with pytest.raises(ExportError, match=message):
            check_architecture(config)
