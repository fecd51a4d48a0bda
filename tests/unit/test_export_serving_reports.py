"""Tester reports on serving advice (vLLM, Ollama) and on merging a LoRA on the embeddings of a tied base."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig

from tests.unit.export_fixtures import adapter_logits, export_recipe, llama64_dir, make_run, token_ids  # noqa: F401
from peftkit.config.schema import QuantizationConfig
from peftkit.export.adapter_export import build_manifest
from peftkit.export.compat import (AdapterInfo, VLLM_MAX_LORA_RANKS, ollama_loads_gguf_lora, read_adapter,
                                   serving_compatibility, vllm_max_lora_rank)

torch.set_num_threads(1)
EMBEDDING_LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], task_type="CAUSAL_LM")


def _lora(**config: object) -> AdapterInfo:
    return AdapterInfo(Path("."), {"peft_type": "LORA", "r": 8, "lora_alpha": 16, **config})


def _qlora_manifest(**quantization: object) -> dict:
    """The manifest of a QLoRA adapter trained with these quantization settings (no files, no weights)."""
    run = SimpleNamespace(
        info=_lora(), base_config=SimpleNamespace(model_type="llama"), quantization=QuantizationConfig(**quantization),
        model_cfg=SimpleNamespace(name="base"), source=SimpleNamespace(kind="local", path=None, revision=None,
                                                                        is_gguf=False),
        recipe=SimpleNamespace(data=SimpleNamespace(system_prompt=None)), run_dir=Path("run"))
    return build_manifest(run, [])


def test_vllm_qlora_advice_matches_how_vllm_quantizes_the_base():
    same = _qlora_manifest(bits=4, quant_type="nf4", blocksize=64, double_quant=True)["serving"]["vllm"]["notes"][-1]
    assert "`--quantization bitsandbytes`" in same and "other weights" not in same
    for settings, named in [({"blocksize": 32}, "blocksize 32"), ({"quant_type": "fp4"}, "quant_type 'fp4'"),
                            ({"double_quant": False}, "double_quant False"), ({"bits": 8}, "an 8-bit (LLM.int8) base")]:
        note = _qlora_manifest(**settings)["serving"]["vllm"]["notes"][-1]
        assert "would serve it on other weights than it trained on" in note, settings
        assert named in note and "`peftkit merge`" in note and "serve it on the unquantized base" not in note
        assert "None" not in note, "an 8-bit record has no 4-bit keys to list"


def test_vllm_qlora_advice_with_layers_kept_unquantized():
    from peftkit.export.compat import vllm_quantized_base_note

    default = QuantizationConfig().model_dump()
    assert "other weights" not in vllm_quantized_base_note({**default, "keep_modules": []})
    assert "other weights" in vllm_quantized_base_note({**default, "keep_modules": ["down_proj"]})


@pytest.mark.parametrize("rank, expected", [(1, 1), (8, 8), (17, 32), (300, 320), (321, 512), (512, 512)])
def test_vllm_max_lora_rank_is_one_vllm_accepts(rank, expected):
    assert vllm_max_lora_rank(rank) == expected
    vllm = serving_compatibility(_lora(r=rank), "llama")["vllm"]
    assert vllm["compatible"]
    assert any(f"--max-lora-rank {expected} " in n for n in vllm["notes"]) == (rank > 16)


@pytest.mark.parametrize("config", [{"r": 600}, {"r": 1024}, {"r": 8, "rank_pattern": {"q_proj": 1024}}])
def test_a_rank_above_vllms_largest_is_not_vllm_compatible(config):
    assert vllm_max_lora_rank(600) is None
    vllm = serving_compatibility(_lora(**config), "llama")["vllm"]
    assert not vllm["compatible"]
    assert any(f"largest --max-lora-rank vLLM accepts ({VLLM_MAX_LORA_RANKS[-1]})" in r and "`peftkit merge`" in r
               for r in vllm["reasons"])
    assert not any("--max-lora-rank 1024" in n for n in vllm["notes"])


@pytest.mark.parametrize("model_type, loads", [("llama", True), ("mistral", True), ("qwen2", True), ("gemma2", True),
                                               ("phi3", True), ("qwen3", False), ("gemma3_text", False),
                                               ("gemma3", False), ("qwen3_moe", False), (None, True)])
def test_ollama_gguf_lora_support_by_architecture(model_type, loads):
    assert ollama_loads_gguf_lora(model_type) is loads
    llama_cpp = serving_compatibility(_lora(), model_type)["llama.cpp"]
    warned = [n for n in llama_cpp["notes"] if "loras are not yet implemented" in n]
    if model_type in ("llama", "qwen2", "gemma2", "qwen3", "gemma3_text"):  # GGUF LoRA files peftkit writes
        assert llama_cpp["compatible"]
        assert bool(warned) is not loads
        assert all("`peftkit export RUN_DIR --format gguf`" in n and "llama.cpp itself does load it" in n for n in warned)


def test_embedding_lora_on_a_tied_base_merges_into_the_trained_model(export_recipe, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from peftkit.export.hf import export_hf

    run = make_run(tmp_path / "run", export_recipe, EMBEDDING_LORA, scale=0.2)
    result = export_hf(run)  # verified in a fresh process against the unmerged adapter
    assert result.verification["passed"]
    out = run / "merged"
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    base = AutoModelForCausalLM.from_pretrained(export_recipe["model"]["name"], dtype=torch.float32)
    weights = load_file(str(out / "model.safetensors"))
    assert torch.equal(weights["lm_head.weight"], base.lm_head.weight)  # the head as trained: the base's own
    assert not torch.equal(weights["model.embed_tokens.weight"], base.model.embed_tokens.weight)
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = token_ids()
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - adapter_logits(run, ids)).abs().max() < 1e-4


def test_qlora_embedding_lora_on_a_tied_base_merges_into_the_trained_model(export_recipe, tmp_path, caplog):
    from peftkit.export.merge import merge_run

    run = make_run(tmp_path / "qrun", export_recipe, EMBEDDING_LORA, scale=0.2,
                   quantization={"bits": 4, "quant_type": "nf4", "double_quant": True})
    with caplog.at_level(logging.INFO, logger="peftkit"):
        merged = merge_run(run)  # merges twice (dequantized and original base), says the untie once
    assert sum("matrix of its own" in r.getMessage() for r in caplog.records) == 1
    assert merged.qlora["dequantized_max_abs_diff"] < 1e-3 and merged.merge_max_abs_diff < 1e-3
    assert merged.model.config.tie_word_embeddings is False
    head, tokens = merged.model.get_output_embeddings(), merged.model.get_input_embeddings()
    assert head.weight.data_ptr() != tokens.weight.data_ptr()


def test_embedding_lora_on_a_tied_base_exports_as_gguf_with_its_own_output_head(export_recipe, tmp_path):
    from gguf import GGUFReader

    from peftkit.export.gguf_writer import export_gguf

    run = make_run(tmp_path / "run", export_recipe, EMBEDDING_LORA, scale=0.2)
    result = export_gguf(run, gguf_type="f32")  # checks the merge against the adapter before writing
    names = {t.name for t in GGUFReader(str(next(result.path.glob("*.gguf")))).tensors}
    assert {"output.weight", "token_embd.weight"} <= names


def test_manifest_of_an_embedding_lora_says_what_serving_engines_do_with_it(export_recipe, tmp_path):
    run = make_run(tmp_path / "run", export_recipe, EMBEDDING_LORA)
    info = read_adapter(run / "adapter")
    assert info.embedding_modules == ["model.embed_tokens"]
    engines = serving_compatibility(info, "llama", tied_embeddings=True)  # the llama64 test base ties them
    assert not engines["llama.cpp"]["compatible"]
    assert any("ties its output head to the input embeddings" in r and "model.embed_tokens" in r
               for r in engines["llama.cpp"]["reasons"])
    assert any("input embeddings (model.embed_tokens)" in n and "`peftkit merge`" in n
               for n in engines["vllm"]["notes"])


def test_the_manifest_judges_a_head_or_embedding_lora_by_whether_the_base_ties_them(export_recipe, tmp_path):
    """build_manifest must hand the base's tie to the llama.cpp verdict, or an embedding LoRA on a tied base (which
    llama.cpp applies to the shared head too) is marked compatible."""
    from peftkit.export.merge import resolve_run

    run = resolve_run(make_run(tmp_path / "run", export_recipe, EMBEDDING_LORA))
    assert run.base_config.tie_word_embeddings
    verdict = build_manifest(run, [])["serving"]["llama.cpp"]
    assert not verdict["compatible"] and any("ties its output head" in reason for reason in verdict["reasons"])
