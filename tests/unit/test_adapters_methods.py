"""Every adapter method on the tiny model: trains, trains the right parameters, saves, reloads, generates.

Also: the SFT trainer's sparse-logits loss equals the model's own full-logits loss for every
method (prompt tuning prepends virtual tokens; prefix tuning does not).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from peftkit.adapters import base_model_view, parameter_counts
from peftkit.config import recipe_from_dict
from peftkit.evaluate.generation import generate_replies
from peftkit.runs import load_run
from peftkit.train.run import train
from peftkit.train.trainer import SFTTrainer
from tests.conftest import CHAT_RECORDS
from tests.unit.adapters_fixtures import ALL_METHODS, CaptureModel, adapter_config, build, chat_batch, recipe_for

torch.set_num_threads(1)

QUESTIONS = [
    [{"role": "user", "content": "what time does the library open?"}],
    [{"role": "user", "content": "who is the head librarian? tell me"}],
    [{"role": "user", "content": "hello"}],
]


def _trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _check_trainable(method: str, model: torch.nn.Module) -> None:
    names = _trainable_names(model)
    assert names
    trainable, total = parameter_counts(model)
    if method in ("lora", "qlora"):
        assert all("lora_" in n for n in names), names
    elif method in ("prefix_tuning", "prompt_tuning"):
        assert all("prompt_encoder" in n for n in names), names
        if method == "prompt_tuning":
            assert trainable == 16 * model.config.hidden_size  # num_virtual_tokens x hidden
    elif method == "ia3":
        assert all("ia3_l" in n for n in names), names
    elif method == "full":
        assert trainable == total
    elif method == "partial":  # train_last_layers: 1 of 2, head (tied to the embeddings)
        assert any(".layers.1." in n for n in names)
        assert not any(".layers.0." in n for n in names)
        assert set(names) - {n for n in names if ".layers.1." in n} == {"model.embed_tokens.weight", "model.norm.weight"}
    assert 0 < trainable <= total


@pytest.mark.parametrize("method", ALL_METHODS)
def test_method_trains_saves_reloads_and_generates(method, tiny_recipe, tiny_tokenizer, tmp_path):
    capture = CaptureModel()
    result = train(recipe_from_dict(recipe_for(tiny_recipe, method, tmp_path)), extra_callbacks=[capture])
    summary = result.summary

    # A few steps on a small set lower its loss.
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.01, summary
    trained = capture.model
    _check_trainable(method, trained)
    assert summary["trainable_params"] == parameter_counts(trained)[0]

    saved = result.run_dir / ("model" if method in ("full", "partial") else "adapter")
    assert list(saved.glob("*.safetensors")), f"{saved} has no safetensors"
    assert not list(saved.glob("*.bin"))

    run = load_run(result.run_dir)
    batch = chat_batch(tiny_tokenizer, CHAT_RECORDS)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    trained.eval()
    with torch.no_grad():
        expected = trained(**inputs).logits
        got = run.model(**inputs).logits
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()

    # peftkit's batched generation path, and plain generate with and without the KV cache.
    replies = generate_replies(run.model, run.tokenizer, QUESTIONS, max_new_tokens=6, batch_size=3)
    assert len(replies) == 3 and all(isinstance(r.text, str) for r in replies)
    prompt = run.tokenizer("what time does the library open?", return_tensors="pt")
    with torch.no_grad():
        cached = run.model.generate(**prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        uncached = run.model.generate(**prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6, use_cache=False)
    assert cached.shape[1] == prompt["input_ids"].shape[1] + 6
    assert torch.equal(cached, uncached)


SYSTEM = "you are a helpful assistant. answer briefly. the library opens at nine and closes at five on weekdays."


@pytest.mark.parametrize("system_prompt", [False, True], ids=["plain", "shared-system-prompt"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_sparse_logits_loss_equals_full_logits_loss(method, system_prompt, tiny_model_dir, tiny_tokenizer, tmp_path):
    """Also with a long shared system prompt, which the trainer may compute once per batch (shared prefix)."""
    from transformers import TrainingArguments

    model = build(tiny_model_dir, method)
    if method in ("prefix_tuning", "prompt_tuning", "ia3"):
        with torch.no_grad():  # move away from the identity init so the adapter matters
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.3)
    model.eval()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4)
    trainer = SFTTrainer(model=model, args=args, supervised_logits_only=True)
    assert trainer.sparse_logits
    records = CHAT_RECORDS[:3]
    if system_prompt:
        records = [{"messages": [{"role": "system", "content": SYSTEM}, *r["messages"]]} for r in records]
    batch = chat_batch(tiny_tokenizer, records)
    if system_prompt:  # make sure the shared-prefix path really runs where it applies
        from peftkit.train.shared_prefix import batch_prefix_length
        from peftkit.train.trainer import supervised_mask

        assert batch_prefix_length(batch["input_ids"], batch["attention_mask"], supervised_mask(batch["labels"])) > 0
        assert trainer.share_prefix == (method not in ("prefix_tuning", "prompt_tuning"))
    with torch.no_grad():
        reference = model(**batch, use_cache=False).loss  # the model's own loss over all logits
        sparse = trainer.compute_loss(model, dict(batch))
        trainer.sparse_logits = False
        dense = trainer.compute_loss(model, dict(batch))
        trainer.sparse_logits = True
        assert torch.allclose(sparse, reference, atol=1e-5), (method, sparse, reference)
        assert torch.allclose(dense, reference, atol=1e-5), (method, dense, reference)
        with base_model_view(model):  # the "before" eval of a prompt-tuned model prepends nothing
            base_reference = model(**batch, use_cache=False).loss
            assert torch.allclose(trainer.compute_loss(model, dict(batch)), base_reference, atol=1e-5)
    if method in ("prefix_tuning", "prompt_tuning", "ia3"):
        assert not torch.allclose(reference, base_reference), "the adapter must change the loss"


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning"])
def test_batched_generation_matches_greedy_forward_passes(method, tiny_model_dir, tiny_tokenizer):
    """Left-padded batches (peftkit's generation path) give exactly the unpadded, cache-free greedy tokens."""
    model = build(tiny_model_dir, method)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.5)
    model.eval()
    texts = ["hello world how are you today", "one two", "the wifi password is"]

    def greedy(text: str, steps: int = 5) -> list[int]:
        ids = tiny_tokenizer(text, return_tensors="pt")["input_ids"]
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
        return ids[0, -steps:].tolist()

    side = tiny_tokenizer.padding_side
    tiny_tokenizer.padding_side = "left"
    try:
        batch = tiny_tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tiny_tokenizer.padding_side = side
    with torch.no_grad():
        expected = [greedy(t) for t in texts]
        for use_cache in (True, False):
            out = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=use_cache,
                                 pad_token_id=tiny_tokenizer.pad_token_id)
            assert out[:, batch["input_ids"].shape[1]:].tolist() == expected, use_cache


def test_prompt_tuning_generation_never_pads_the_soft_prompt(tiny_model_dir, tiny_tokenizer):
    """peft ignores position ids for prompt tuning: left padding would move the soft prompt, so peftkit regroups."""
    model = build(tiny_model_dir, "prompt_tuning")
    model.eval()
    masks: list[torch.Tensor] = []
    inner = model.base_model.generate

    def recording_generate(*args, **kwargs):
        masks.append(kwargs["attention_mask"].clone())
        return inner(*args, **kwargs)

    model.base_model.generate = recording_generate
    side = tiny_tokenizer.padding_side
    tiny_tokenizer.padding_side = "left"
    try:
        batch = tiny_tokenizer(["hello world how are you today", "one two", "the wifi password is"], return_tensors="pt", padding=True)
    finally:
        tiny_tokenizer.padding_side = side
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=2)
        assert out.shape == (3, batch["input_ids"].shape[1] + 3)
        lengths = set(batch["attention_mask"].sum(1).tolist())
        assert len(lengths) > 1 and len(masks) == len(lengths)
        assert all(bool(m.all()) for m in masks), "each length group is generated unpadded"
        masks.clear()
        type(model).generate(model, **batch, max_new_tokens=3, do_sample=False, pad_token_id=2)  # peft alone
        assert not bool(masks[0].all()), "without the fix the padded batch reaches the model"


def test_partial_run_logs_trainable_counts(tiny_recipe, tmp_path):
    recipe = recipe_for(tiny_recipe, "partial", tmp_path, train_last_layers=2, unfreeze_schedule={"every_steps": 3})
    result = train(recipe_from_dict(recipe))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: (r["trainable_params"], r["unfrozen_blocks"]) for r in records if "loss" in r}
    assert steps[1][1] == 0 and steps[4][1] == 1 and steps[7][1] == 2
    assert steps[1][0] < steps[4][0] < steps[7][0]
    card = (result.run_dir / "README.md").read_text()  # no adapter: the card names the trained model
    assert card.splitlines()[0].endswith(f"partial fine-tune of {tiny_recipe['model']['name']}")
    assert "Files: `model/` (the whole trained model)" in card and "`adapter/`" not in card


def test_loraplus_recipe_trains_with_its_optimizer(tiny_recipe, tmp_path):
    """`adapter.loraplus_lr_ratio` reaches the Trainer: its optimizer steps B at lr x ratio (after the schedule)."""

    class CaptureLrs(TrainerCallback):
        def __init__(self) -> None:
            self.lrs: dict[str, float] = {}

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            names = {id(p): n for n, p in model.named_parameters()}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    self.lrs[names[id(p)]] = group["lr"]

    recipe = recipe_for(tiny_recipe, "lora", tmp_path, loraplus_lr_ratio=8)
    capture = CaptureLrs()
    result = train(recipe_from_dict(recipe), extra_callbacks=[capture])
    assert result.summary["eval_loss_after"] < result.summary["eval_loss_before"]
    lr = recipe["train"]["lr"]
    b = [v for k, v in capture.lrs.items() if "lora_B" in k]
    a = [v for k, v in capture.lrs.items() if "lora_A" in k]
    assert b and a and len(b) + len(a) == len(capture.lrs)
    assert all(v == pytest.approx(8 * lr) for v in b) and all(v == pytest.approx(lr) for v in a)  # constant schedule


def test_prefix_tuning_fits_a_multi_query_cache_peft_cannot_read_from_the_config(tiny_tokenizer):
    """Falcon names its key/value heads `multi_query` / `num_kv_heads`: peft alone sizes the prefix for all
    attention heads and the first forward fails inside attention. peftkit sizes it from the model's cache."""
    from transformers import FalconConfig, FalconForCausalLM

    from peftkit.adapters import build_adapter

    from peftkit.errors import ConfigError

    def falcon(**stray):
        torch.manual_seed(0)
        return FalconForCausalLM(FalconConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, multi_query=True, **stray))

    model = build_adapter(falcon(), adapter_config("prefix_tuning"))
    config = model.peft_config["default"]
    assert (config.num_attention_heads, config.token_dim, config.num_layers) == (1, 8, 2)
    ids = tiny_tokenizer(["hello world", "one two three"], return_tensors="pt", padding=True)
    loss = model(**ids, labels=ids["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id).shape[1] \
        == ids["input_ids"].shape[1] + 3
    # A stray num_key_value_heads, which Falcon's code never reads but peft sizes the prefix from over any size given:
    # the first step crashed inside attention ("Expected size 2 but got size 1"); now one message, before training.
    with pytest.raises(ConfigError, match=r"caches 1 key/value head\(s\), but its config says num_key_value_heads=2"):
        build_adapter(falcon(num_key_value_heads=2), adapter_config("prefix_tuning"))


@pytest.mark.parametrize(("config_name", "targets"), [
    ("Phi3Config", {"qkv_proj", "down_proj"}),         # fused keys / values
    ("Starcoder2Config", {"k_proj", "v_proj", "c_proj"}),  # the MLP's output is `mlp.c_proj`
])
def test_ia3_finds_its_modules_where_peft_has_no_default(config_name, targets):
    import transformers
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    from peftkit.adapters import build_adapter

    config = getattr(transformers, config_name)(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2)
    assert config.model_type not in PEFT_DEFAULTS, "peft covers it now: pick another architecture for this test"
    model = build_adapter(transformers.AutoModelForCausalLM.from_config(config), adapter_config("ia3"))
    scaled = {name.split(".")[-3] for name, p in model.named_parameters() if p.requires_grad}
    assert scaled == targets
    feedforward = set(model.peft_config["default"].feedforward_modules)
    assert feedforward == ({"down_proj"} if "down_proj" in targets else {"mlp.c_proj"})
