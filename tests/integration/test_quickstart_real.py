"""The real default model end to end: GGUF conversion, LoRA and QLoRA training, reload, chat."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftkit.config import load_recipe
from peftkit.config.schema import ModelConfig
from peftkit.data.chat import with_system_prompt
from peftkit.evaluate import generate_replies
from peftkit.models import load_model, load_tokenizer
from peftkit.runs import load_run
from peftkit.train.run import train

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def test_converted_default_model_knows_paris():
    tokenizer = load_tokenizer(ModelConfig())
    model = load_model(ModelConfig())
    (reply,) = generate_replies(model, tokenizer, [[{"role": "user", "content": "What is the capital of France?"}]], max_new_tokens=20)
    assert "Paris" in reply.text and reply.finished


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """The quickstart recipe, shortened: 24 steps, held-out scored after training only."""
    out = tmp_path_factory.mktemp("qs") / "run"
    recipe = load_recipe(QUICKSTART, [f"output_dir={out}", "train.max_steps=24", "eval.before=false", "train.eval_steps=24"])
    return train(recipe).run_dir


def test_quickstart_short_run_learns_and_stops_by_itself(lora_run):
    summary = json.loads((lora_run / "summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.5
    assert summary["heldout_accuracy_after"] is not None and summary["heldout_questions"] == 60
    # The end-of-turn token is supervised, so replies end on their own instead of running to max_new_tokens.
    assert summary["heldout_finished_share_after"] >= 0.9
    assert 0.01 < summary["trainable_share"] < 0.06
    assert (lora_run / "plots" / "loss.png").stat().st_size > 10_000


def test_reloaded_adapter_reproduces_trained_answers(lora_run):
    run = load_run(lora_run)
    details = [json.loads(line) for line in (lora_run / "heldout.jsonl").read_text().splitlines()[:4]]
    conversations = [with_system_prompt([{"role": "user", "content": d["question"]}], run.recipe.data.system_prompt) for d in details]
    replies = generate_replies(run.model, run.tokenizer, conversations, max_new_tokens=run.recipe.eval.max_new_tokens)
    assert [r.text for r in replies] == [d["reply"] for d in details]


def test_chat_cli_answers_one_prompt(lora_run):
    result = subprocess.run(
        [sys.executable, "-m", "peftkit.cli", "chat", str(lora_run), "--prompt", "What is the wifi password?", "--max-new-tokens", "32"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 3


def test_qlora_4bit_trains_saves_and_generates(tmp_path):
    recipe = load_recipe(
        QUICKSTART,
        [f"output_dir={tmp_path / 'q'}", "adapter.method=qlora", "adapter.gradient_checkpointing=false",
         "train.max_steps=3", "eval.before=false", "data.heldout=null", "data.max_seq_len=128", "eval.sample_prompts=[Hello]"],
    )
    result = train(recipe)
    summary = result.summary
    assert summary["quantization"]["bits"] == 4 and summary["method"] == "qlora"
    assert summary["samples"][0]["reply"]
    run = load_run(result.run_dir)
    linear4 = [m for m in run.model.modules() if type(m).__name__ == "Linear4bit"]
    assert linear4, "the reloaded base is 4-bit again"
    with torch.inference_mode():
        ids = run.tokenizer("Hello", return_tensors="pt")
        assert torch.isfinite(run.model(**ids).logits).all()
