"""LoRA's hashed-counter dropout: nn.Dropout's distribution and gradient, reproducible from torch's seed."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from peftkit.train.fast_dropout import HashedDropout, keep_scale, use_hashed_dropout
from tests.conftest import build_tiny_llama


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_masks_keep_each_element_with_probability_one_minus_p_scaled_as_nn_dropout(p):
    n = 1_000_000
    scale = keep_scale(torch.Size([n]), p)
    assert scale.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
    kept = (scale > 0).double()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(kept.mean().item() - (1 - p)) < 5 * sd
    assert abs(scale.double().mean().item() - 1) < 5 * sd / (1 - p), "the expectation is kept, as nn.Dropout's"


def test_masks_are_independent_between_neighbours_and_between_calls():
    n = 1_000_000
    first, second = (keep_scale(torch.Size([n]), 0.5) > 0 for _ in range(2))
    assert not torch.equal(first, second)
    limit = 5 / n**0.5  # correlation of independent coin flips: about 1 / sqrt(n)
    pairs = [(first[:-1], first[1:]), (first[:-4096], first[4096:]), (first, second)]
    for a, b in pairs:
        assert abs(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1].item()) < limit
    rows = keep_scale(torch.Size([1000, 1000]), 0.5) > 0  # the same column of consecutive rows
    assert abs(torch.corrcoef(torch.stack([rows[:-1].flatten().double(), rows[1:].flatten().double()]))[0, 1]) < limit


def test_torch_seed_decides_the_masks():
    torch.manual_seed(7)
    a = keep_scale(torch.Size([64, 32]), 0.3)
    torch.manual_seed(7)
    assert torch.equal(keep_scale(torch.Size([64, 32]), 0.3), a)
    torch.manual_seed(8)
    assert not torch.equal(keep_scale(torch.Size([64, 32]), 0.3), a)


def test_hashed_dropout_forward_and_gradient_follow_its_mask():
    dropout = HashedDropout(0.2)
    x = torch.randn(50, 40, requires_grad=True)
    torch.manual_seed(3)
    out = dropout(x)
    torch.manual_seed(3)
    scale = keep_scale(x.shape, 0.2)
    torch.testing.assert_close(out, x * scale)
    out.sum().backward()
    torch.testing.assert_close(x.grad, scale)
    dropout.eval()
    assert dropout(x) is x or torch.equal(dropout(x), x), "eval: identity, as nn.Dropout"
    assert torch.equal(HashedDropout(0.0).train()(x), x)
    assert torch.equal(HashedDropout(1.0).train()(x), torch.zeros_like(x))


def test_the_sft_trainer_swaps_loras_dropouts_on_a_cpu_only(tiny_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from peftkit.train.trainer import SFTTrainer

    def lora_model():
        return get_peft_model(build_tiny_llama(len(tiny_tokenizer)), LoraConfig(r=4, target_modules="all-linear",
                                                                                lora_dropout=0.1))

    def dropouts(model):
        return [type(m) for m in model.modules() if type(m) in (nn.Dropout, HashedDropout)]

    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    model = lora_model()
    count = len(dropouts(model))
    assert count == 2 * 7 and set(dropouts(model)) == {nn.Dropout}  # 2 layers x 7 linear modules
    SFTTrainer(model=model, args=args)
    assert dropouts(model) == [HashedDropout] * count
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, HashedDropout))
    kept = lora_model()
    SFTTrainer(model=kept, args=args, hashed_dropout=False)
    assert set(dropouts(kept)) == {nn.Dropout}
    assert use_hashed_dropout(kept) == count and use_hashed_dropout(kept) == 0, "swapped once"


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
@pytest.mark.parametrize("hashed", [True, False])
def test_the_recipe_key_decides_the_dropout_both_trainers_train_with(task, hashed, tiny_recipe, tmp_path):
    from transformers import TrainerCallback

    from peftkit.config import recipe_from_dict
    from peftkit.train.run import train

    seen: list[set[type]] = []

    class DropoutTypes(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.append({type(d) for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)
                         for d in m.lora_dropout.values()})

    recipe = {**tiny_recipe, "adapter": {**tiny_recipe["adapter"], "dropout": 0.1},
              "train": {**tiny_recipe["train"], "max_steps": 1, "hashed_dropout": hashed}, "eval": {"before": False}}
    if task == "sequence_classification":
        rows = [{"text": t, "label": label} for t, label in [("good food", "positive"), ("bad food", "negative")] * 4]
        data = tmp_path / "labels.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        recipe = {**recipe, "task": task, "data": {"train": str(data), "max_seq_len": 16}}
    train(recipe_from_dict(recipe), extra_callbacks=[DropoutTypes()])
    assert seen == [{HashedDropout if hashed else nn.Dropout}]


def test_each_rank_of_a_distributed_run_draws_its_own_masks(monkeypatch):
    """Every rank starts from the same torch seed and draws one number a call: the rank must enter the mask."""
    def masks(rank):
        if rank is not None:
            monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
            monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank)
        torch.manual_seed(0)
        return [keep_scale(torch.Size([20_000]), 0.5) > 0 for _ in range(3)]

    alone, rank0, rank1, rank3 = masks(None), masks(0), masks(1), masks(3)
    assert all(torch.equal(a, b) for a, b in zip(alone, rank0)), "rank 0 draws a single process's masks"
    for other in (rank1, rank3):
        for a, b in zip(rank0, other):
            assert abs((a == b).double().mean().item() - 0.5) < 0.02  # independent Bernoulli(0.5): agree half the time
    assert all(abs((a == b).double().mean().item() - 0.5) < 0.02 for a, b in zip(rank1, rank3))


def test_the_index_buffer_grows_to_the_largest_input_not_double(monkeypatch):
    from peftkit.train import fast_dropout

    monkeypatch.setattr(fast_dropout, "_counters", torch.empty(0, dtype=torch.int32))
    assert torch.equal(fast_dropout._indices(1000), torch.arange(1000, dtype=torch.int32))
    assert fast_dropout._counters.numel() == 1125  # an eighth of headroom
    fast_dropout._indices(1100)
    assert fast_dropout._counters.numel() == 1125, "fits: not rebuilt"
    assert torch.equal(fast_dropout._indices(1500), torch.arange(1500, dtype=torch.int32))
    assert fast_dropout._counters.numel() == 1687  # doubling would have made it 2250
