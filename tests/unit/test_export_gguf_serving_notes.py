"""What the adapter manifest and the GGUF exports say about llama.cpp / Ollama: a LoRA on the output head or the token
embeddings (tied or untied base), Ollama's own engine, and Gemma 2, whose llama.cpp graph has no output head of its
own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig

from tests.unit.export_fixtures import export_recipe, llama64_dir, make_run  # noqa: F401
from tests.unit.test_export_gguf import FAMILY_EXTRAS, _family_dir, _fields
from peftkit.errors import ExportError
from peftkit.export.compat import AdapterInfo, serving_compatibility

torch.set_num_threads(1)

_LORA_KEYS = {  # the tensors peft saves for a LoRA on each layer (shapes: r 4, vocab 300, hidden 64)
    "lm_head": {"base_model.model.lm_head.lora_A.weight": (4, 64), "base_model.model.lm_head.lora_B.weight": (300, 4),
                "base_model.model.lm_head.base_layer.weight": (300, 64)},
    "model.embed_tokens": {"base_model.model.model.embed_tokens.lora_embedding_A": (4, 300),
                           "base_model.model.model.embed_tokens.lora_embedding_B": (64, 4),
                           "base_model.model.model.embed_tokens.base_layer.weight": (300, 64)},
    "transformer.wpe": {"base_model.model.transformer.wpe.lora_embedding_A": (4, 256),
                        "base_model.model.transformer.wpe.lora_embedding_B": (64, 4)},
}


def _adapter(module: str) -> AdapterInfo:
    shapes = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (4, 64),
              "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (64, 4), **_LORA_KEYS[module]}
    return AdapterInfo(Path("."), {"peft_type": "LORA", "r": 4, "lora_alpha": 8}, shapes)


@pytest.mark.parametrize("module", ["lm_head", "model.embed_tokens"])
def test_llama_cpp_verdict_on_a_head_or_embedding_lora_follows_whether_the_base_ties_them(module):
    untied = serving_compatibility(_adapter(module), "llama", tied_embeddings=False)["llama.cpp"]
    assert untied["compatible"] and not untied["reasons"], untied
    written = [n for n in untied["notes"] if f"`{module}`" in n]
    assert written and "output.weight / token_embd.weight" in written[0]
    assert "base_layer.weight" in written[0] and "must equal the base's weights" in written[0]

    tied = serving_compatibility(_adapter(module), "llama", tied_embeddings=True)["llama.cpp"]
    assert not tied["compatible"]
    why = "no output.weight for the LoRA on `lm_head`" if module == "lm_head" else "apply the embedding LoRA on"
    assert any("ties its output head to the input embeddings" in r and why in r for r in tied["reasons"]), tied
    assert tied["notes"] == ["merge it into the base instead: `peftkit export RUN_DIR --format gguf`"]

    unknown = serving_compatibility(_adapter(module), "llama")["llama.cpp"]  # a caller that does not know the base
    assert unknown["compatible"] and any("tie_word_embeddings: false" in n for n in unknown["notes"])


def test_llama_cpp_verdict_refuses_an_embedding_lora_off_the_token_embeddings():
    engines = serving_compatibility(_adapter("transformer.wpe"), "gpt2", tied_embeddings=False)
    assert engines["llama.cpp"]["reasons"] == ["llama.cpp applies an embedding LoRA to the token embeddings "
                                               "(token_embd.weight) only; this adapter has one on `transformer.wpe`"]


def test_an_untied_gemma2_base_is_no_llama_cpp_base_at_all():
    plain = AdapterInfo(Path("."), {"peft_type": "LORA", "r": 4, "lora_alpha": 8})
    assert serving_compatibility(plain, "gemma2", tied_embeddings=True)["llama.cpp"]["compatible"]
    untied = serving_compatibility(plain, "gemma2", tied_embeddings=False)["llama.cpp"]
    assert not untied["compatible"]
    assert any("llama.cpp's gemma2 runs the output head with the token embeddings" in r for r in untied["reasons"])
    assert serving_compatibility(plain, "gemma3_text", tied_embeddings=False)["llama.cpp"]["compatible"]


def _gguf_adapter_export(run: Path, out: Path) -> tuple[str, list[str]]:
    from peftkit.export.gguf_lora import export_gguf_adapter

    result = export_gguf_adapter(run, out, gguf_type="f32", check=False)
    return (out / "Modelfile").read_text(), result.notes


def test_the_gguf_adapter_modelfile_warns_first_where_ollamas_own_engine_runs_the_base(export_recipe, tmp_path):
    run = make_run(tmp_path / "run", {**export_recipe, "name": "desk"},
                   LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM"),
                   model_dir=_family_dir(tmp_path / "qwen3", "qwen3"))
    modelfile, notes = _gguf_adapter_export(run, tmp_path / "out")
    header, rest = modelfile.split("# Ollama Modelfile written by peftkit", 1)
    assert header and all(line.startswith("# ") for line in header.splitlines())  # comments: still a valid Modelfile
    said = " ".join(line[2:] for line in header.splitlines())
    assert "Ollama runs qwen3 models on its own engine, which does not load ADAPTER files" in said
    assert '"loras are not yet implemented"' in said and "llama.cpp itself does load it" in said
    assert f"`peftkit export {run} --format gguf`" in said
    assert "\nADAPTER ./desk-lora-f32.gguf\n" in rest
    assert any("loras are not yet implemented" in n and "the Modelfile says so" in n for n in notes)

    plain, plain_notes = _gguf_adapter_export(make_run(tmp_path / "llama", export_recipe, LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM")), tmp_path / "llama-out")
    assert plain.startswith("# Ollama Modelfile written by peftkit")
    assert not any("loras are not yet implemented" in n for n in plain_notes)


def _gemma_config(model_type: str, **extra: Any) -> Any:
    from transformers import AutoConfig

    settings = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                "num_key_value_heads": 2, "pad_token_id": 0, "num_hidden_layers": 2, **FAMILY_EXTRAS[model_type]}
    return AutoConfig.for_model(model_type, **{**settings, **extra})


def test_llama_cpp_reads_no_own_head_for_gemma2_so_an_untied_one_is_refused():
    import gguf

    from peftkit.export.gguf_writer import GGUF_ARCHITECTURES, LLAMA_CPP_EMBEDDINGS_AS_HEAD, check_architecture

    for layout in GGUF_ARCHITECTURES.values():  # gguf-py names an output head for every other architecture
        has_head = gguf.MODEL_TENSOR.OUTPUT in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[layout.arch]]
        assert has_head is (layout.arch not in LLAMA_CPP_EMBEDDINGS_AS_HEAD), layout.arch
    assert check_architecture(_gemma_config("gemma2")).arch == "GEMMA2"
    for with_rope in (True, False):  # the model GGUF and the GGUF LoRA alike
        with pytest.raises(ExportError, match=r"llama.cpp's gemma2 runs the output head with the token embeddings .* "
                                              r"this model has a head of its own \(tie_word_embeddings: false\)"):
            check_architecture(_gemma_config("gemma2", tie_word_embeddings=False), with_rope=with_rope)
    assert check_architecture(_gemma_config("gemma3_text", tie_word_embeddings=False)).arch == "GEMMA3"


@pytest.mark.parametrize("lora", [
    {"target_modules": ["q_proj", "embed_tokens"]},
    {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
])
def test_a_gemma2_merge_that_would_untie_the_head_is_refused_before_merging(export_recipe, tmp_path, monkeypatch, lora):
    from peftkit.export import gguf_writer

    run = make_run(tmp_path / "run", {**export_recipe, "name": "g2"}, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                                                                                 **lora),
                   model_dir=_family_dir(tmp_path / "g2", "gemma2"))

    def no_merge(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("merged before refusing")

    monkeypatch.setattr(gguf_writer, "shipped_model", no_merge)
    with pytest.raises(ExportError, match=r"merging this run unties its gemma2 base's output head: .*; but llama.cpp's "
                                          r"gemma2 runs the output head with the token embeddings"):
        gguf_writer.export_gguf(run, tmp_path / "out", gguf_type="f32")
    assert not (tmp_path / "out").exists()
    from peftkit.export.gguf_lora import export_gguf_adapter

    with pytest.raises(ExportError) as caught:  # the GGUF LoRA's refusal does not send the user to that one
        export_gguf_adapter(run, tmp_path / "lora", gguf_type="f32")
    said = str(caught.value)
    assert "merged gguf is refused too" in said.lower() and "--format gguf`" not in said, said
    assert "llama.cpp runs a gemma2 model's output head with the token embeddings" in said
    assert "serve it with vLLM or transformers + peft" in said and "--format adapter" in said


def test_gemma3_runs_an_untied_merged_head_in_llama_cpp(export_recipe, tmp_path):
    """Gemma 3 reads output.weight: the merged head a LoRA on tied embeddings leaves is run as trained."""
    from peftkit.export.gguf_writer import export_gguf

    run = make_run(tmp_path / "run", {**export_recipe, "name": "g3"}, LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], task_type="CAUSAL_LM"),
        model_dir=_family_dir(tmp_path / "g3", "gemma3_text"), scale=0.2)
    result = export_gguf(run, gguf_type="f32")
    report = json.loads((result.path / "verification.json").read_text())
    assert report["passed"] and report["llama_cpp"]["ran"] and report["llama_cpp"]["passed"], report["llama_cpp"]
    assert "output.weight" in {t.name for t in _fields(result.path / "g3-f32.gguf")[1].tensors}


def test_the_cli_writes_a_gguf_adapter(export_recipe, tmp_path):
    from peftkit.cli import main

    run = make_run(tmp_path / "run", export_recipe, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                               task_type="CAUSAL_LM"))
    assert main(["export", str(run), "--format", "gguf-adapter", "--gguf-type", "f32", "--no-verify"]) == 0
    assert len(list((run / "gguf-adapter").glob("*-lora-f32.gguf"))) == 1
