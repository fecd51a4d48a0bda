"""The fast loss paths equal the plain full-logits loss, in value and in gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftkit.train.shared_prefix import SharedPrefix, forward_after_prefix, shared_prefix_length
from peftkit.train.trainer import supervised_mask
from tests.conftest import build_tiny_llama


@pytest.fixture
def lora_model(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = build_tiny_llama(len(tiny_tokenizer))
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights="gaussian"))
    model.train()
    return model


def batch(vocab: int, shared: int = 9):
    torch.manual_seed(1)
    ids = torch.randint(5, vocab, (4, 20))
    ids[:, :shared] = ids[0, :shared]
    labels = ids.clone()
    labels[:, :12] = -100
    mask = torch.ones_like(ids)
    mask[1, 16:] = 0
    labels[1, 16:] = -100
    return ids, mask, labels


def full_logits_loss(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_sparse_and_shared_prefix_losses_match_full_logits(lora_model, tiny_tokenizer):
    ids, mask, labels = batch(len(tiny_tokenizer))
    keep = supervised_mask(labels)
    targets = labels[:, 1:][labels[:, 1:] != -100]

    reference = full_logits_loss(lora_model, ids, mask, labels)
    reference.backward()
    expected = grads(lora_model)
    lora_model.zero_grad()

    sparse = F.cross_entropy(lora_model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits, targets)
    sparse.backward()
    got_sparse = grads(lora_model)
    lora_model.zero_grad()

    prefix = shared_prefix_length(ids, keep)
    assert prefix == 9
    outputs = forward_after_prefix(lora_model, {"input_ids": ids, "attention_mask": mask}, keep,
                                   SharedPrefix.run(lora_model, ids, prefix))
    shared = F.cross_entropy(outputs.logits, targets)
    shared.backward()
    got_shared = grads(lora_model)

    assert float(sparse) == pytest.approx(float(reference), abs=1e-6)
    assert float(shared) == pytest.approx(float(reference), abs=1e-6)
    for name, value in expected.items():
        torch.testing.assert_close(got_sparse[name], value, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(got_shared[name], value, atol=1e-6, rtol=1e-4)


def test_shared_prefix_stops_before_first_supervised_prediction():
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9, 9]])
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, 2:] = True
    assert shared_prefix_length(ids, keep) == 2
    keep[:] = False
    assert shared_prefix_length(ids, keep) == 4
    assert shared_prefix_length(ids[:1], keep[:1]) == 0, "a single row has nothing to share"


def test_length_buckets_cover_the_batch_and_split_only_when_padding_outweighs_a_call():
    from peftkit.train.bucketing import length_buckets

    assert length_buckets([50, 52, 49, 51]) == [[2, 0, 3, 1]]  # near-equal lengths: one call
    buckets = length_buckets([30, 400, 35, 410, 32, 390], overhead=48)
    assert buckets == [[0, 4, 2], [5, 1, 3]]
    assert sorted(i for b in length_buckets([7, 300, 12, 90, 250, 3, 180, 64]) for i in b) == list(range(8))


@pytest.mark.parametrize("with_teacher, top_layer_only", [(False, False), (True, False), (False, True)])
def test_bucketed_batch_gives_the_same_loss_and_gradients(lora_model, tiny_tokenizer, tmp_path, monkeypatch, with_teacher,
                                                          top_layer_only):
    """The trainer's length buckets change the padding, not the loss or the gradients. The shared prompt prefix runs
    once per step, not once per bucket: the first bucket's share of its gradient reaches it in the last backward.
    With the lower layer frozen (LoRA on the top one only), its prefix keys and values take no gradient."""
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from peftkit.data.build import PaddingCollator
    from peftkit.train.distill import TEACHER_IDS, TEACHER_PROBS, supervised_targets
    from peftkit.train.trainer import SFTTrainer

    if top_layer_only:
        torch.manual_seed(0)
        lora_model = get_peft_model(build_tiny_llama(len(tiny_tokenizer)), LoraConfig(
            r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], layers_to_transform=[1], lora_dropout=0.0,
            init_lora_weights="gaussian"))
    torch.manual_seed(2)
    vocab = len(tiny_tokenizer)
    rows = []
    for length in (14, 60, 16, 64, 15, 58):  # two clearly different lengths: the batch splits in two
        ids = torch.randint(5, vocab, (length,)).tolist()
        ids[:9] = rows[0]["input_ids"][:9] if rows else ids[:9]  # a shared prefix, as chat data has
        labels = [-100] * 10 + ids[10:]
        rows.append({"input_ids": ids, "labels": labels})
    if with_teacher:  # a distilled row inside the batch: its soft targets must follow it into its bucket
        n = len(supervised_targets(rows[1]["labels"]))
        rows[1] = {**rows[1], TEACHER_IDS: [[3, 4, 5]] * n, TEACHER_PROBS: [[0.5, 0.3, 0.2]] * n}
    collate = PaddingCollator(tiny_tokenizer.pad_token_id)
    from peftkit.train.bucketing import length_buckets

    assert len(length_buckets([len(r["input_ids"]) for r in rows])) == 2, "the bucketed path really splits this batch"
    results, prefix_runs = {}, []
    real_run = SharedPrefix.run
    def counted_run(cls, *args):
        prefix = real_run(*args)
        prefix_runs.append(prefix.length)
        needs = [k.requires_grad for k, _ in prefix.states]
        assert needs == [not top_layer_only, True]
        assert [k.requires_grad for k, _ in prefix.detached().states] == needs
        return prefix

    monkeypatch.setattr(SharedPrefix, "run", classmethod(counted_run))
    # (bucketed, back-propagating each bucket early); not early: one backward through every bucket and the prefix
    for bucket, early in ((False, True), (True, True), (True, False)):
        trainer = SFTTrainer(model=lora_model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True),
                             data_collator=collate, bucket_within_batch=bucket)
        trainer.backward_each_bucket = early
        assert trainer.bucket_batches == bucket
        lora_model.zero_grad(set_to_none=True)
        lora_model.train()
        loss = trainer.compute_loss(lora_model, collate(rows))
        # Bucketed, the first bucket is back-propagated inside compute_loss (its activations freed at once).
        assert any(p.grad is not None for p in lora_model.parameters()) == (bucket and early)
        loss.backward()
        results[bucket, early] = (float(loss), grads(lora_model))
        assert prefix_runs == [9], "one prefix run per step, buckets or not"
        prefix_runs.clear()
    # The Trainer's own step (backward of the returned loss) gives the same gradients again.
    lora_model.zero_grad(set_to_none=True)
    trainer.backward_each_bucket = True
    stepped = trainer.training_step(lora_model, collate(rows))
    plain_loss, plain_grads = results[False, True]
    assert float(stepped) == pytest.approx(plain_loss, rel=1e-5)
    for name, value in grads(lora_model).items():
        torch.testing.assert_close(value, plain_grads[name], atol=1e-6, rtol=1e-4)
    for early in (True, False):
        assert results[True, early][0] == pytest.approx(plain_loss, rel=1e-5)
        for name, value in plain_grads.items():
            torch.testing.assert_close(results[True, early][1][name], value, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("trainer_class", ["SFTTrainer", "ClassificationTrainer"])
def test_evaluations_are_timed_in_training_only_and_preparation_is_subtracted_once(lora_model, tiny_tokenizer, tmp_path,
                                                                                    trainer_class):
    """transformers measures the model's preparation at the first evaluation and subtracted it from every later
    one's runtime (negative eval_runtime under DDP, where the wrap takes seconds, and for a classifier on a busy CPU:
    the classification trainer lacked the fix). Both trainers time their evaluations during training themselves."""
    from transformers import TrainingArguments

    from peftkit.data.build import PaddingCollator
    from peftkit.train import classification, trainer as sft

    torch.manual_seed(3)
    rows = [{"input_ids": (ids := torch.randint(5, len(tiny_tokenizer), (12,)).tolist()), "labels": [-100] * 4 + ids[4:]}
            for _ in range(4)]
    trainer_type = getattr(sft, trainer_class, None) or getattr(classification, trainer_class)
    trainer = trainer_type(model=lora_model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True),
                           data_collator=PaddingCollator(tiny_tokenizer.pad_token_id), eval_dataset=rows)
    first = trainer.evaluate()
    assert "eval_model_preparation_time" in first  # this transformers still measures it: the fix is still needed
    second = trainer.evaluate()
    assert "eval_model_preparation_time" not in second and second["eval_runtime"] > 0
    assert trainer.eval_seconds_in_training == 0.0  # outside train(): not part of the training time
    trainer.is_in_train = True  # as during train()
    trainer.evaluate()
    assert trainer.eval_seconds_in_training > 0


@pytest.mark.parametrize("window, shared_calls", [(8, 0), (64, 1)])
def test_sliding_window_models_share_the_prefix_only_within_the_window(tiny_tokenizer, tmp_path, monkeypatch,
                                                                        window, shared_calls):
    """Gemma 2/3, Mistral v0.1, Phi-3: past the window the model's own cache drops the sliding layers' earliest
    keys, which the broadcast prefix cache keeps (a crash, or another loss). Rows wider than the window run
    unshared; shorter ones keep the saving. Either way the loss is the plain one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments

    from peftkit.train import trainer as trainer_module
    from peftkit.train.trainer import SFTTrainer

    torch.manual_seed(0)
    config = AutoConfig.for_model("gemma3_text", vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  query_pre_attn_scalar=16, sliding_window=window, pad_token_id=0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights="gaussian"))
    model.train()
    calls = []
    real = trainer_module.forward_after_prefix
    monkeypatch.setattr(trainer_module, "forward_after_prefix", lambda *a: calls.append(1) or real(*a))
    trainer = SFTTrainer(model=model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True),
                         bucket_within_batch=False)
    assert trainer.share_prefix and trainer.attention_window == window
    ids, mask, labels = batch(len(tiny_tokenizer))  # 20 tokens, 9 shared
    loss = trainer.compute_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert len(calls) == shared_calls
    assert float(loss) == pytest.approx(float(full_logits_loss(model, ids, mask, labels)), abs=1e-5)


def _rows_of_mixed_length(vocab: int, with_teacher: bool = False) -> list[dict]:
    from peftkit.train.distill import TEACHER_IDS, TEACHER_PROBS, supervised_targets

    torch.manual_seed(3)
    rows = []
    for length in (14, 40, 16, 33):
        ids = torch.randint(5, vocab, (length,)).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 6 + ids[6:]})
    if with_teacher:  # soft targets stay in row order when the rows are joined
        n = len(supervised_targets(rows[1]["labels"]))
        rows[1] = {**rows[1], TEACHER_IDS: [[3, 4, 5]] * n, TEACHER_PROBS: [[0.5, 0.3, 0.2]] * n}
    return rows


@pytest.mark.parametrize("attention, with_teacher", [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_packed_batch_gives_the_same_loss_and_gradients(tiny_tokenizer, tmp_path, attention, with_teacher):
    """`train.packing`: the batch as one padding-free sequence trains on the same rows with the same loss and
    gradients (attention stays within each row), whichever attention implementation runs it."""
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from peftkit.data.build import PaddingCollator
    from peftkit.train.trainer import SFTTrainer

    torch.manual_seed(0)
    model = build_tiny_llama(len(tiny_tokenizer))
    model.config._attn_implementation = attention
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights="gaussian"))
    collate = PaddingCollator(tiny_tokenizer.pad_token_id)
    rows = _rows_of_mixed_length(len(tiny_tokenizer), with_teacher)
    results, seen = {}, {}
    for packing in (False, True):
        trainer = SFTTrainer(model=model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True),
                             data_collator=collate, packing=packing, bucket_within_batch=False)
        assert trainer.share_prefix is False or not packing
        calls = []
        hook = model.get_base_model().model.register_forward_pre_hook(
            lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
        model.zero_grad(set_to_none=True)
        model.train()
        loss = trainer.compute_loss(model, collate(rows))
        loss.backward()
        hook.remove()
        results[packing], seen[packing] = (float(loss), grads(model)), calls
    assert seen[True] == [torch.Size([1, 14 + 40 + 16 + 33])]  # one row, no padding
    assert seen[False] == [torch.Size([4, 40])]
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    for name, value in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], value, atol=1e-6, rtol=1e-4)


def test_packing_is_refused_for_a_model_that_attends_across_the_joined_rows(tiny_tokenizer, tmp_path):
    """A model whose attention ignores the restarting positions would silently learn across rows: refused."""
    from transformers import TrainingArguments

    from peftkit.errors import ConfigError
    from peftkit.train.packing import flatten_batch, packed_rows_stay_separate
    from peftkit.train.trainer import SFTTrainer

    torch.manual_seed(0)
    model = build_tiny_llama(len(tiny_tokenizer))
    assert packed_rows_stay_separate(model)
    forward = model.forward
    model.forward = lambda *a, position_ids=None, **k: forward(*a, **k)  # drops the positions: plain causal attention
    assert not packed_rows_stay_separate(model)
    with pytest.raises(ConfigError, match="attends across the rows"):
        SFTTrainer(model=model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True), packing=True)

    joined, labels = flatten_batch({"input_ids": torch.tensor([[7, 8, 9], [4, 5, 0]]),
                                    "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])},
                                   torch.tensor([[7, 8, 9], [4, 5, -100]]))
    assert joined["input_ids"].tolist() == [[7, 8, 9, 4, 5]] and joined["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert labels.tolist() == [[-100, 8, 9, -100, 5]]  # each row's first label is never a target


def test_packing_recipe_checks():
    from peftkit.config.schema import Recipe

    base = {"data": {"train": "t.jsonl"}, "train": {"packing": True}}
    assert Recipe.model_validate(base).train.packing
    with pytest.raises(ValueError, match="virtual tokens"):
        Recipe.model_validate({**base, "adapter": {"method": "prefix_tuning"}})
    with pytest.raises(ValueError, match="neftune"):
        Recipe.model_validate({**base, "train": {"packing": True, "neftune_noise_alpha": 5}})


def test_a_cache_holding_more_than_keys_and_values_turns_the_shared_prefix_off(lora_model, tiny_tokenizer, tmp_path,
                                                                               monkeypatch, caplog):
    """Linear-attention, KV-sharing or indexed cache layers cannot be broadcast as keys and values: the first step
    says so once and runs unshared, with the same loss."""
    from types import SimpleNamespace

    from transformers import TrainingArguments
    from transformers.cache_utils import DynamicLayer

    from peftkit.train.trainer import SFTTrainer

    class LinearAttentionState:
        keys = values = None

    def fake_model(*layers):
        return lambda **kwargs: SimpleNamespace(past_key_values=SimpleNamespace(layers=list(layers)))

    ids = torch.zeros(1, 10, dtype=torch.long)
    reason = SharedPrefix.run(fake_model(DynamicLayer(), LinearAttentionState()), ids, 9)
    assert isinstance(reason, str) and "LinearAttentionState" in reason
    assert "DynamicLayer" in SharedPrefix.run(fake_model(DynamicLayer()), ids, 9), "a layer never filled has no keys"

    trainer = SFTTrainer(model=lora_model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True))
    monkeypatch.setattr(SharedPrefix, "run", classmethod(lambda cls, *a: "the model's cache (X) holds more"))
    ids, mask, labels = batch(len(tiny_tokenizer))
    with caplog.at_level("INFO", logger="peftkit.train.trainer"):
        loss = trainer.compute_loss(lora_model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert not trainer.share_prefix and "share_prompt_prefix is off" in caplog.text
    assert float(loss) == pytest.approx(float(full_logits_loss(lora_model, ids, mask, labels)), abs=1e-5)


def test_several_gpus_seen_by_one_process_train_on_one_not_in_data_parallel(lora_model, tmp_path, caplog):
    """transformers would wrap the model in nn.DataParallel (and multiply the batch size by the GPU count)."""
    import logging

    from transformers import TrainingArguments

    from peftkit.train.trainer import SFTTrainer

    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=4)
    assert args.device.type == "cpu"
    args._n_gpu = 3  # as _setup_devices sets it for three visible GPUs and no launcher
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        trainer = SFTTrainer(model=lora_model, args=args)
    assert args.n_gpu == 1 and args.train_batch_size == 4
    assert trainer._wrap_model(trainer.model) is trainer.model
    assert "3 CUDA GPUs are visible to this one process" in caplog.text and "--nproc 3" in caplog.text
