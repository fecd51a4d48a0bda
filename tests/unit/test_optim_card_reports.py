"""Reported: QLoRA exports and cards use the compute dtype the run trained in; LoRA+ speeds up only the B matrices;
summary.json counts examples and rows apart."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig

from tests.conftest import write_jsonl
from tests.unit.export_fixtures import export_recipe, llama64_dir, make_run  # noqa: F401
from peftkit.config import recipe_from_dict
from peftkit.config.schema import QuantizationConfig

torch.set_num_threads(1)


# ---- 1. the compute dtype a QLoRA run trained in ---------------------------------------------------------------------


def _qlora_run(tmp_path: Path, recipe: dict, compute_dtype: str) -> Path:
    quant = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": compute_dtype}
    return make_run(tmp_path / "qrun", recipe, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                           task_type="CAUSAL_LM"), quantization=quant)


def test_bfloat16_qlora_adapter_export_verifies_and_its_card_names_bfloat16(export_recipe, tmp_path):
    """The reference computed in bfloat16 (the recipe's) and the verification child in float32: they differed by
    bfloat16 rounding and the export failed; the card claimed float32 reproduced the training."""
    from peftkit.export.adapter_export import export_adapter

    result = export_adapter(_qlora_run(tmp_path, export_recipe, "bfloat16"))
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["bitsandbytes_config"]["bnb_4bit_compute_dtype"] == "bfloat16"
    assert result.verification["passed"] and result.verification["max_abs_diff"] < 1e-6  # same dtype on both sides
    snippet = (result.path / "README.md").read_text().split("```python\n")[1].split("```")[0]
    assert "bnb_4bit_compute_dtype='bfloat16'" in snippet and "'float32' reproduces" not in snippet


def test_bfloat16_qlora_merge_is_measured_against_float32_compute(export_recipe, tmp_path):
    """The merged model is float32: its reference computes the trained 4-bit weights in float32 too, so the
    measured error is the merge's, not bfloat16's rounding (which failed `export --format hf` verification)."""
    from peftkit.export.merge import merge_run

    merged = merge_run(_qlora_run(tmp_path, export_recipe, "bfloat16"))
    assert merged.merge_max_abs_diff < 1e-4 and merged.qlora["dequantized_max_abs_diff"] < 1e-4


def test_auto_compute_dtype_is_recorded_as_computed_and_read_back(tiny_recipe, tmp_path):
    """`auto` follows the device: a GPU run computed in bfloat16, which an export on a CPU must not re-resolve."""
    from peftkit.export.card import bnb_kwargs
    from peftkit.runs import trained_quantization
    from peftkit.train.run import summary_header

    recipe = recipe_from_dict({**tiny_recipe, "adapter": {"method": "qlora", "r": 4}})
    quantization = QuantizationConfig(bits=4)
    data = SimpleNamespace(train=[{}] * 3, eval=[{}], stats={})
    header = summary_header(recipe, tmp_path, quantization, "cuda", torch.bfloat16, 1, (1, 10), data,
                            SimpleNamespace(global_step=1))
    assert header["quantization"]["compute_dtype"] == "bfloat16"
    # fp16 training keeps float32 weights (and compute) where gradients reach the model's own weights
    saving = recipe_from_dict({**tiny_recipe, "adapter": {"method": "qlora", "r": 4, "modules_to_save": ["lm_head"]}})
    header16 = summary_header(saving, tmp_path, quantization, "cuda", torch.float16, 1, (1, 10), data,
                              SimpleNamespace(global_step=1))
    assert header16["quantization"]["compute_dtype"] == "float32"

    (tmp_path / "summary.json").write_text(json.dumps(header))
    resolved = trained_quantization(tmp_path, quantization)
    assert resolved.compute_dtype == "bfloat16" and bnb_kwargs(resolved)["bnb_4bit_compute_dtype"] == "bfloat16"
    # a summary written before the record: `auto` computed in the run's dtype
    (tmp_path / "summary.json").write_text(json.dumps({"quantization": quantization.model_dump(), "dtype": "bfloat16"}))
    assert trained_quantization(tmp_path, quantization).compute_dtype == "bfloat16"
    explicit = QuantizationConfig(bits=4, compute_dtype="float16")
    assert trained_quantization(tmp_path, explicit) is explicit  # the recipe's own choice stands


def test_card_says_float32_reproduces_training_only_for_a_float32_run():
    from peftkit.export.card import bnb_kwargs, quantized_base_loading

    bf16_lines, _ = quantized_base_loading(bnb_kwargs(QuantizationConfig(bits=4, compute_dtype="bfloat16")))
    assert "bnb_4bit_compute_dtype='bfloat16'" in bf16_lines[1] and len(bf16_lines) == 2
    fp32_lines, _ = quantized_base_loading(bnb_kwargs(QuantizationConfig(bits=4, compute_dtype="float32")))
    assert "bnb_4bit_compute_dtype='float32' reproduces" in fp32_lines[2]


# ---- 2. LoRA+ parameter groups ----------------------------------------------------------------------------------------


def test_loraplus_speeds_up_only_b_matrices_and_decays_as_the_trainer_does(tiny_model_dir, tmp_path):
    """peft's LoRA+ optimizer gave every 1-D tensor (DoRA magnitudes, a norm trained whole) lr x ratio and weight
    decay; the LoRA on the embeddings keeps peft's own LoRA+ embedding rate."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from peftkit.adapters import build_adapter, trainer_extras
    from peftkit.config.schema import LoraAdapterConfig

    cfg = LoraAdapterConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=True,
                            modules_to_save=["norm"], loraplus_lr_ratio=16)
    model = build_adapter(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32), cfg)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.1, use_cpu=True, report_to="none")
    optimizer = trainer_extras(model, cfg, args).optimizer
    setting = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(setting) == {id(p) for p in trainable.values()}
    kinds = set()
    for name, param in trainable.items():
        lr, decay = setting[id(param)]
        if "embed_tokens.lora_" in name:  # A, B and the DoRA magnitude of the LoRA on the embeddings, as peft groups them
            kinds.add("embedding")
            assert lr == pytest.approx(1e-6), name
        elif "lora_B" in name:
            kinds.add("B")
            assert (lr, decay) == (pytest.approx(1.6e-2), pytest.approx(0.1)), name
        elif "norm" in name:
            kinds.add("norm")
            assert (lr, decay) == (pytest.approx(1e-3), 0.0), name  # not decayed, as without LoRA+
        else:  # A matrices, DoRA magnitudes
            kinds.add("magnitude" if "magnitude" in name else "A")
            assert lr == pytest.approx(1e-3), name
    assert kinds == {"embedding", "B", "norm", "A", "magnitude"}
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3), "the Trainer logs the first group's rate as the run's"


# ---- 3. examples and rows in summary.json ----------------------------------------------------------------------------


def test_summary_counts_examples_and_rows_apart(tiny_recipe, tiny_tokenizer, tmp_path):
    """4 long paragraphs of a .txt file split into more rows: train_examples said the row count."""
    from peftkit.data.build import build_datasets
    from peftkit.train.run import summary_header

    paragraph = " ".join(["The library opens at nine and the wifi password is river."] * 12)
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join([paragraph] * 4) + "\n", encoding="utf-8")
    data_cfg = {"train": str(text), "eval": str(write_jsonl(tmp_path / "eval.jsonl", [{"text": paragraph}])),
                "max_seq_len": 32}
    recipe = recipe_from_dict({**copy.deepcopy(tiny_recipe), "data": data_cfg})
    data = build_datasets(recipe.data, tiny_tokenizer)
    assert len(data.train) > 4  # the premise: each paragraph made several rows
    header = summary_header(recipe, tmp_path, None, "cpu", torch.float32, 1, (1, 10), data, SimpleNamespace(global_step=1))
    assert header["train_examples"] == 4 and header["train_rows"] == len(data.train)
    assert header["eval_rows"] == len(data.eval) and header["eval_examples"] == 1
    from peftkit.train.model_card import _examples

    assert _examples(header) == f"4 examples ({len(data.train)} rows)"
    assert _examples({"train_examples": 5, "train_rows": 5}) == "5 examples"
