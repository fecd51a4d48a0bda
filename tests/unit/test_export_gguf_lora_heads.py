"""GGUF LoRA files with a LoRA on the output head or the token embeddings, run in llama.cpp on the base GGUF.

peft saves such a layer's own weights next to its LoRA (`base_layer.weight`); where they are the base's unchanged,
the file holds the low-rank update alone, as llama.cpp's convert_lora_to_gguf.py writes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from tests.unit.export_fixtures import build_llama_dir, export_recipe, llama64_dir, make_run  # noqa: F401
from tests.unit.test_export_gguf import _fields
from tests.unit.test_export_llama_cpp import _base_gguf
from peftkit.errors import ExportError
from peftkit.export.gguf_lora import check_head_and_embedding_loras, export_gguf_adapter, read_lora_gguf_deltas

torch.set_num_threads(1)


def _lora(*modules: str) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", *modules], task_type="CAUSAL_LM")


def _peft_effect(run: Path, module: str) -> tuple[torch.Tensor, float]:
    """peft's weight delta of `module` (an embedding's as (vocab, dim), like its weight), and how far the adapter's
    logits move when that one LoRA is switched off."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(run / "adapter"))
    layer = model.base_model.model.get_submodule(module)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        layer.scaling["default"] = 0.0
        without = model(input_ids=ids).logits
        layer.scaling["default"] = 2.0  # lora_alpha / r
    return layer.get_delta_weight("default").detach(), float((full - without).abs().max())


@pytest.mark.parametrize(("module", "gguf_name"), [("lm_head", "output.weight"),
                                                    ("model.embed_tokens", "token_embd.weight")])
def test_a_head_or_embedding_lora_on_an_untied_base_runs_in_llama_cpp_as_the_adapter(export_recipe, tmp_path, module,
                                                                                      gguf_name):
    from tests.conftest import build_tiny_tokenizer

    untied = build_llama_dir(tmp_path / "untied", build_tiny_tokenizer(), tie=False)
    base = _base_gguf(untied, tmp_path / "base.gguf")
    run = make_run(tmp_path / "run", {**export_recipe, "name": "desk"}, _lora(module.split(".")[-1]), model_dir=base,
                   scale=0.2)
    result = export_gguf_adapter(run, gguf_type="f32")
    report = json.loads((result.path / "verification.json").read_text())
    assert report["passed"] and report["llama_cpp"]["ran"] and report["llama_cpp"]["passed"], report
    assert report["llama_cpp"]["greedy_exact"] == 1.0

    lora_file = result.path / "desk-lora-f32.gguf"
    names = {tensor.name for tensor in _fields(lora_file)[1].tensors}
    assert {f"{gguf_name}.lora_a", f"{gguf_name}.lora_b"} <= names and not any("base_layer" in n for n in names)
    # the export's own check rebuilds this delta from the file as llama.cpp applies it: it is peft's
    from transformers import AutoModelForCausalLM

    hf_base = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    deltas = read_lora_gguf_deltas(lora_file, AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32))
    expected, effect = _peft_effect(run, module)
    assert torch.allclose(deltas[f"{module}.weight"], expected, atol=1e-6)
    assert effect > 100 * report["llama_cpp"]["max_abs_diff"]  # llama.cpp applied this LoRA, not only q_proj's


@pytest.mark.parametrize(("module", "why"), [
    ("embed_tokens", r"ties its output head to the input embeddings: llama.cpp then runs the head with "
                     r"token_embd.weight itself .*\(it aborts"),
    ("lm_head", r"ties its output head to the input embeddings, so its GGUF has no output.weight for the LoRA on "
                r"`lm_head`"),
])
def test_a_head_or_embedding_lora_on_a_tied_base_is_refused_with_llama_cpps_reason(export_recipe, tmp_path, module,
                                                                                     why):
    run = make_run(tmp_path / "run", export_recipe, _lora(module))  # llama64_dir ties its head to the embeddings
    with pytest.raises(ExportError, match=why + r".*--format gguf` \(merged\) instead"):
        export_gguf_adapter(run, tmp_path / "out", gguf_type="f32")
    assert not (tmp_path / "out").exists()


def test_a_copy_of_the_embeddings_with_a_resized_vocabulary_is_refused_as_such(export_recipe, tmp_path):
    from tests.conftest import build_tiny_tokenizer

    from peftkit.export.merge import resolve_run

    untied = build_llama_dir(tmp_path / "untied", build_tiny_tokenizer(), tie=False)
    run = resolve_run(make_run(tmp_path / "run", export_recipe, _lora("embed_tokens"), model_dir=untied))
    vocab, dim = run.base_config.vocab_size, run.base_config.hidden_size
    with pytest.raises(ExportError, match=rf"copy of `model.embed_tokens` has shape \({vocab + 8}, {dim}\) and the base "
                                          rf".* has \({vocab}, {dim}\): the vocabulary was resized"):
        check_head_and_embedding_loras(run, {"model.embed_tokens": "token_embd.weight"}, {"model.embed_tokens"},
                                       {"model.embed_tokens": torch.zeros(vocab + 8, dim)})


def test_an_embedding_lora_off_the_token_embeddings_is_refused(export_recipe, tmp_path):
    from peftkit.export.merge import resolve_run

    run = resolve_run(make_run(tmp_path / "run", export_recipe, _lora()))
    with pytest.raises(ExportError, match=r"embedding LoRA on `transformer.wpe` \(position_embd.weight\), and "
                                          r"llama.cpp applies one to the token embeddings \(token_embd.weight\) only"):
        check_head_and_embedding_loras(run, {"transformer.wpe": "position_embd.weight"}, {"transformer.wpe"}, {})
