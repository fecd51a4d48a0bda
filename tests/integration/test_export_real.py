"""The real default model: train a few LoRA steps, merge (verified in a fresh process), export GGUF f16
and check, through transformers' GGUF loader and in llama.cpp itself, that it answers like the merged model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftkit.config import load_recipe
from peftkit.export.gguf_lora import export_gguf_adapter
from peftkit.export.gguf_writer import write_gguf_export
from peftkit.export.hf import write_merged
from peftkit.export.merge import merge_run
from peftkit.train.run import train

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def test_trained_run_merges_and_exports_to_gguf_that_answers_the_same(tmp_path):
    torch.set_num_threads(1)
    recipe = load_recipe(QUICKSTART, [
        f"output_dir={tmp_path / 'run'}", "train.max_steps=4", "train.num_threads=1", "eval.before=false",
        "data.heldout=null", "data.max_seq_len=256", "eval.sample_prompts=[Hello]", "eval.max_new_tokens=8",
    ])
    run_dir = train(recipe).run_dir

    merged = merge_run(run_dir)
    assert merged.merge_max_abs_diff < 1e-3, merged.merge_max_abs_diff
    hf = write_merged(merged, run_dir / "merged")
    assert hf.verification["passed"] and hf.verification["greedy_exact"] == 1.0, hf.verification
    assert hf.verification["tokenizer_match"] and hf.verification["template_match"]
    # the card names the Hub model the built-in weights come from, not peftkit's alias
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in (run_dir / "merged" / "README.md").read_text()

    gguf = write_gguf_export(merged, run_dir / "gguf", gguf_type="f16")
    # written by transformers' GGUF loader (AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)) in a fresh
    # process, on 5 chat prompts extended by the merged model's greedy answers
    report = json.loads((run_dir / "gguf" / "verification.json").read_text())
    assert report["kind"] == "gguf" and report["passed"], report
    assert report["greedy_agreement"] >= 0.95 and report["greedy_exact"] >= 0.8, report
    assert report["max_abs_diff"] < 0.5, report  # f16 weights, logits up to ~40
    assert report["tokenizer_match"] and report["template_match"], report  # tokenizer + chat template in the GGUF
    name = next(f for f in gguf.files if f.endswith(".gguf"))
    modelfile = (run_dir / "gguf" / "Modelfile").read_text()
    assert f"FROM ./{name}" in modelfile and recipe.data.system_prompt in modelfile
    # ... and run in llama.cpp itself: same logits along the same tokens, llama.cpp's own tokenization of the prompts
    in_llama_cpp = report["llama_cpp"]
    assert in_llama_cpp["ran"] and in_llama_cpp["passed"] and in_llama_cpp["greedy_exact"] == 1.0, in_llama_cpp
    assert in_llama_cpp["max_abs_diff"] < 0.5 and in_llama_cpp["tokenizer_match"], in_llama_cpp

    # the LoRA alone, in llama.cpp on the Q4_1 GGUF the model came from (the Modelfile's FROM): llama.cpp's 4-bit
    # kernels quantize the activations too, so it is close, not equal
    lora = export_gguf_adapter(run_dir, gguf_type="f16")
    on_source = json.loads((lora.path / "verification.json").read_text())["llama_cpp"]
    assert on_source["ran"] and on_source["model"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf"), on_source
    assert on_source["passed"] and on_source["precision"] == "llama.cpp-quantized-base", on_source
    assert on_source["greedy_agreement"] >= 0.85, on_source
    # a GGUF LoRA has no chat template or system prompt: its Modelfile brings the trained ones, not the base GGUF's
    adapter_modelfile = (lora.path / "Modelfile").read_text()
    assert "ADAPTER ./" in adapter_modelfile and f'SYSTEM """{recipe.data.system_prompt}"""' in adapter_modelfile
    assert 'TEMPLATE """{{ if .System }}<|im_start|>system' in adapter_modelfile

    # a 4-bit file holds exactly the merged weights rounded as it stores them (transformers' reader), runs in llama.cpp
    # close to them (quantized activations), and reports what the rounding costs against the float model
    q4 = write_gguf_export(merged, run_dir / "gguf-q4_0", gguf_type="q4_0")  # rounds `merged` in place: kept last
    assert q4.verification["passed"] and q4.verification["max_abs_diff"] < 1e-3, q4.verification
    assert q4.verification["llama_cpp"]["passed"], q4.verification["llama_cpp"]
    rounding = q4.verification["rounding"]
    assert rounding["max_abs_diff"] > 0.1 and rounding["greedy_agreement"] >= 0.5, rounding
