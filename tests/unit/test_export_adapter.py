"""Adapter-only export: PEFT layout, manifest, serving-engine compatibility, upstream peft loads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig

from tests.unit.export_fixtures import adapter_logits, export_recipe, llama64_dir, make_run, token_ids  # noqa: F401
from peftkit.cli import main
from peftkit.export.adapter_export import export_adapter
from peftkit.export.compat import read_adapter, serving_compatibility

torch.set_num_threads(1)


def test_adapter_export_is_standard_peft_and_verified_in_a_fresh_process(export_recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    run = make_run(tmp_path / "run", export_recipe, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                               task_type="CAUSAL_LM"))
    result = export_adapter(run)
    out = run / "adapter-export"
    for name in ["adapter_config.json", "adapter_model.safetensors", "manifest.json", "README.md",
                 "verification.json", "tokenizer_config.json", "chat_template.jinja"]:
        assert name in result.files, name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["peft_type"] == "LORA" and manifest["method"] == "LoRA"
    assert manifest["rank"] == 4 and manifest["alpha"] == 8
    assert manifest["base_model"]["name"] == export_recipe["model"]["name"]
    assert manifest["base_model"]["path"] == export_recipe["model"]["name"] and manifest["base_model"]["hidden_size"] == 64
    assert "model.layers.0.self_attn.q_proj" in manifest["target_modules"]
    assert manifest["serving"]["vllm"]["compatible"] is True
    assert result.notes[0].startswith("vLLM multi-LoRA: yes; ") and "vllm serve BASE --enable-lora" in result.notes[0]
    assert manifest["files"]["adapter_model.safetensors"]["sha256"]
    report = json.loads((out / "verification.json").read_text())
    assert report["passed"] and report["kind"] == "peft" and report["max_abs_diff"] < 1e-5
    assert manifest["verified"]["loader"].startswith("peft.PeftModel.from_pretrained")
    assert manifest["system_prompt"] == export_recipe["data"]["system_prompt"]
    assert "send it as the first message" in (out / "README.md").read_text()
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(str(out)).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith(f"<|im_start|>system\n{export_recipe['data']['system_prompt']}<|im_end|>\n")

    base = AutoModelForCausalLM.from_pretrained(manifest["base_model"]["path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    ids = token_ids()
    with torch.no_grad():
        assert (model(input_ids=ids).logits - adapter_logits(run, ids)).abs().max() == 0


def test_manifest_lists_why_vllm_would_reject_the_adapter(export_recipe, tmp_path):
    config = LoraConfig(r=32, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True,
                        modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    run = make_run(tmp_path / "run", export_recipe, config)
    result = export_adapter(run, tmp_path / "out", check=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    vllm = manifest["serving"]["vllm"]
    assert vllm["compatible"] is False
    assert result.notes[0].startswith("vLLM multi-LoRA: no - ") and "vllm serve" not in result.notes[0]
    assert any("DoRA" in r for r in vllm["reasons"]) and any("modules_to_save" in r for r in vllm["reasons"])
    assert any("--max-lora-rank 32" in n for n in vllm["notes"])
    assert manifest["serving"]["llama.cpp"]["compatible"] is False
    assert manifest["serving"]["llama.cpp"]["notes"] == ["merge it into the base instead: `peftkit export RUN_DIR --format gguf`"]
    assert manifest["method"] == "DoRA" and manifest["modules_to_save"] == ["lm_head"]
    # transformers' own adapter loading leaves DoRA's magnitude vectors out: the manifest says to load it with peft
    assert any("transformers' own adapter loading" in n for n in manifest["serving"]["transformers+peft"]["notes"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| vllm | no |" in card and f"| rank / alpha | {manifest['rank']} / {manifest['alpha']} |" in card


def test_prefix_tuning_exports_as_adapter_and_loads_upstream(export_recipe, tmp_path, capsys):
    run = make_run(tmp_path / "run", export_recipe, PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    assert main(["export", str(run), "--format", "adapter", "--out", str(tmp_path / "prefix")]) == 0
    printed = capsys.readouterr().out
    assert "Verified in a fresh process" in printed and "vLLM multi-LoRA: no" in printed
    manifest = json.loads((tmp_path / "prefix" / "manifest.json").read_text())
    assert manifest["peft_type"] == "PREFIX_TUNING"
    assert json.loads((tmp_path / "prefix" / "verification.json").read_text())["max_abs_diff"] < 1e-5
    card = (tmp_path / "prefix" / "README.md").read_text()
    assert "| peft type | PREFIX_TUNING |" in card and "rank / alpha" not in card, "no rank to report"


def test_serving_compatibility_rules():
    from pathlib import Path

    from peftkit.export.compat import AdapterInfo

    plain = AdapterInfo(Path("."), {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": True})
    engines = serving_compatibility(plain, "llama")
    assert engines["vllm"]["compatible"] and engines["llama.cpp"]["compatible"]
    assert len(engines["transformers+peft"]["notes"]) == 1, "the DoRA loading note is for DoRA only"
    ia3 = serving_compatibility(AdapterInfo(Path("."), {"peft_type": "IA3"}), "llama")
    assert not ia3["vllm"]["compatible"] and "IA3" in ia3["vllm"]["reasons"][0]
    assert not serving_compatibility(plain, "bloom")["llama.cpp"]["compatible"]


def test_read_adapter_reads_shapes_without_loading(export_recipe, tmp_path):
    run = make_run(tmp_path / "run", export_recipe, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                               task_type="CAUSAL_LM"))
    info = read_adapter(run / "adapter")
    assert info.shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (4, 64)
    assert info.method == "LoRA" and not info.is_prompt_learning


@pytest.mark.parametrize("extra", [{}, {"keep_modules": ["down_proj"]}, {"blocksize": 32}],
                         ids=["all-4bit", "down_proj-kept", "blocksize-32"])
def test_qlora_adapter_export_is_verified_on_the_4bit_base(extra, export_recipe, tmp_path):
    """The verification child loads the base as training did, including `keep_modules` (else down_proj
    would be 4-bit there and the logits would differ) and the block size."""
    quant = {"bits": 4, "quant_type": "nf4", "double_quant": True, **extra}
    run = make_run(tmp_path / "qrun", export_recipe, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                task_type="CAUSAL_LM"), quantization=quant)
    result = export_adapter(run)
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["method"] == "QLoRA (LoRA)" and manifest["quantization"]["bits"] == 4
    report = result.verification
    assert report["passed"] and report["max_abs_diff"] < 1e-4 and "LoRA adapter as peftkit loads it" == report["reference"]
    # the card loads the base quantized as training did (on the original weights the adapter answers differently)
    card = (result.path / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0]
    compile(snippet, "card", "exec")
    assert "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True" in snippet
    assert "quantization_config=quantization)" in snippet
    assert ("llm_int8_skip_modules=" in snippet) == bool(extra.get("keep_modules"))
    assert ("blocks of 32" in snippet) == (extra.get("blocksize") == 32)
    # verified in float32: the card suggests bfloat16 for a GPU and says which dtype reproduces the verification
    assert manifest["bitsandbytes_config"]["bnb_4bit_compute_dtype"] == "float32"
    assert "bnb_4bit_compute_dtype='bfloat16'" in snippet and "compute_dtype='float32' reproduces the training" in snippet
    assert "the verification ran with it off: set `support_avx512bf16_for_cpu = False`" in snippet  # plain peft on a CPU
    assert "as in training" not in snippet
    assert any("--quantization bitsandbytes" in note for note in manifest["serving"]["vllm"]["notes"])


def test_adapter_export_verifies_on_a_pickled_base_the_recipe_allows(export_recipe, llama64_dir, tmp_path):
    """A base with only `.bin` weights (`model.allow_pickle: true`) is loaded the same way by the fresh-process check."""
    import shutil

    import yaml
    from safetensors.torch import load_file

    run = make_run(tmp_path / "run", export_recipe, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                               task_type="CAUSAL_LM"))
    pickled = tmp_path / "pickled-base"
    shutil.copytree(llama64_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"].update(name=str(pickled), allow_pickle=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    export_adapter(run)
    report = json.loads((run / "adapter-export" / "verification.json").read_text())
    assert report["passed"] and report["max_abs_diff"] < 1e-5


def test_the_adapter_card_says_when_the_base_weights_are_a_converted_gguf():
    """The card's front matter names the hub checkpoint (for the Hub's links); its body says the adapter was
    trained on the GGUF file's dequantized weights, which answer a little differently."""
    from peftkit.export.card import adapter_card

    manifest = {"base_model": {"name": "smollm2-135m-instruct", "path": "/cache/smollm2", "model_type": "llama",
                               "note": "trained on the dequantized weights of this GGUF file, not on the original hub "
                                       "checkpoint; load the base from `path` for identical results"},
                "method": "lora", "peft_type": "LORA", "rank": 4, "alpha": 8, "target_modules": ["q_proj"],
                "serving": {}}
    card = adapter_card(manifest, None, Path("/out"))
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "| base weights | trained on the dequantized weights of this GGUF file, not on the original hub" in card
    del manifest["base_model"]["note"]
    assert "| base weights |" not in adapter_card(manifest, None, Path("/out"))


def test_a_full_runs_export_advice_names_gguf_only_where_gguf_export_works():
    """A Mixtral / Falcon / GPT-J full run was told to ship with `--format gguf`, which refuses those models."""
    from transformers import AutoConfig

    from peftkit.export.adapter_export import _gguf_writable

    assert _gguf_writable(AutoConfig.for_model("llama", hidden_size=64, num_hidden_layers=1, num_attention_heads=4))
    for kind in ("gptj", "falcon", "mixtral"):
        assert not _gguf_writable(AutoConfig.for_model(kind)), kind
