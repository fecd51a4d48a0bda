"""One short run per method family on the real default model (SmolLM2-135M): train a few steps, reload, generate.

Each run: 16 quickstart conversations, max_seq_len 128, 2 steps of batch 4, no "before" scoring,
then `load_run` + peftkit's batched generation. The classification run uses all-MiniLM-L6-v2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftkit.config import load_recipe
from peftkit.data.chat import with_system_prompt
from peftkit.evaluate import generate_replies
from peftkit.runs import load_run
from peftkit.train.run import train

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ["What is the wifi password?", "Who is the head librarian?"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("methods-data")
    lines = (ROOT / "recipes" / "data" / "quickstart" / "train.jsonl").read_text().splitlines()
    (folder / "train.jsonl").write_text("\n".join(lines[:16]) + "\n")
    return {"data.train": str(folder / "train.jsonl"), "out": str(folder)}


def _short_run(recipe_name: str, small_data: dict[str, str], method: str, *extra: str) -> tuple[Path, dict]:
    overrides = [
        f"data.train={small_data['data.train']}",
        "data.heldout=null",
        "data.eval_fraction=0.25",
        "data.max_seq_len=128",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.num_threads=2",
        "train.logging_steps=1",
        "eval.before=false",
        "eval.max_new_tokens=12",
        f"output_dir={small_data['out']}/{method}",
        *extra,
    ]
    result = train(load_recipe(ROOT / "recipes" / recipe_name, overrides))
    return result.run_dir, result.summary


def _generate(run_dir: Path) -> list[str]:
    run = load_run(run_dir)
    conversations = [with_system_prompt([{"role": "user", "content": q}], run.recipe.data.system_prompt) for q in QUESTIONS]
    replies = generate_replies(run.model, run.tokenizer, conversations, max_new_tokens=12)
    assert all(r.text.strip() for r in replies), replies
    return [r.text for r in replies]


def test_lora(small_data):
    """Plain LoRA (DoRA is covered on the tiny model: its CPU generation recomputes weight norms every token)."""
    run_dir, summary = _short_run("quickstart.yaml", small_data, "lora")
    assert 0.005 < summary["trainable_share"] < 0.06 and summary["steps"] == 2
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    _generate(run_dir)


def test_qlora_4bit(small_data):
    run_dir, summary = _short_run("quickstart-qlora.yaml", small_data, "qlora")
    assert summary["quantization"]["bits"] == 4 and summary["steps"] == 2
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    _generate(run_dir)


def test_prefix_tuning(small_data):
    run_dir, summary = _short_run("quickstart-prefix.yaml", small_data, "prefix")
    assert summary["trainable_share"] < 0.1  # only the prefix (and its MLP while training)
    run = load_run(run_dir)
    prompt = run.tokenizer("The library opens at", return_tensors="pt")
    with torch.no_grad():
        cached = run.model.generate(**prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        uncached = run.model.generate(**prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    _generate(run_dir)


def test_partial(small_data):
    run_dir, summary = _short_run(
        "quickstart-partial.yaml", small_data, "partial", "adapter.unfreeze_schedule.every_steps=1", "train.lr=5e-4"
    )
    assert (run_dir / "model" / "model.safetensors").is_file() and not (run_dir / "adapter").exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    blocks = [r["unfrozen_blocks"] for r in records if "loss" in r]
    assert blocks == [2, 3]  # start_layers 2, one more block per step
    _generate(run_dir)


def test_sentiment_minilm(tmp_path):
    overrides = ["train.max_steps=30", "train.num_threads=2", f"output_dir={tmp_path / 'cls'}"]
    result = train(load_recipe(ROOT / "recipes" / "sentiment-minilm.yaml", overrides))
    summary = result.summary
    assert summary["labels"] == ["negative", "positive"]
    assert summary["heldout_examples"] == 80 and summary["heldout_accuracy_after"] is not None
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"]
    assert {s["reply"] for s in summary["samples"]} <= {"negative", "positive"}


def test_replay_with_the_base_models_own_answers_and_distillation(small_data, tmp_path, monkeypatch):
    """Built-in replay set: SmolLM2 answers its prompts itself (cached), replay rows get soft targets."""
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path / "home"))  # an empty answer cache: generation runs
    run_dir, summary = _short_run("quickstart.yaml", small_data, "replay", "data.replay.path=builtin:general",
                                  "data.replay.ratio=0.25", "data.replay.max_answer_tokens=48", "data.replay.distill=true")
    answers = [json.loads(line) for line in (run_dir / "replay_answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3 and all(a["reply"] for a in answers)
    assert summary["data_stats"]["replay_examples"] == sum(a["finished"] for a in answers)
    assert list((tmp_path / "home" / "replay").glob("*.jsonl")), "answers are kept for the next run on this base"


def test_loftq_adapter_starts_at_the_quantization_error():
    """Every nf4 layer's error against the full-precision weight shrinks once the LoftQ adapter is added.
    (On SmolLM2-135M that is 5-12 % per layer, and it does not bring the output logits closer: see docs.)"""
    from peft.utils.integrations import dequantize_module_weight

    from peftkit.adapters import build_adapter
    from peftkit.adapters.loftq import local_model_dir
    from peftkit.models.safetensors_files import SafetensorsWeights
    from peftkit.config.schema import ModelConfig, QLoraAdapterConfig, QuantizationConfig
    from peftkit.models import load_model, resolve_model_ref

    source = resolve_model_ref("smollm2-135m-instruct")
    base = load_model(ModelConfig(), QuantizationConfig(bits=4), device="cpu", dtype=torch.float32, source=source)
    model = build_adapter(base, QLoraAdapterConfig(init="loftq"), quantized=True)
    weights = SafetensorsWeights(local_model_dir(model.get_base_model().config._name_or_path))
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.15.self_attn.v_proj", "model.layers.29.mlp.down_proj"]:
        layer = model.base_model.model.get_submodule(name)
        original = weights.get(name + ".weight").float()
        quantized = dequantize_module_weight(layer.get_base_layer()).float()
        correction = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        assert (original - quantized - correction).norm() < 0.97 * (original - quantized).norm(), name
