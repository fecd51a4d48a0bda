"""Partial fine-tuning: freeze plan, gradual unfreezing through the Trainer's optimizer, layer-wise LR."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import TrainerCallback, TrainingArguments

from peftkit.adapters import build_adapter, trainer_extras
from peftkit.adapters.partial import _stage, freeze_plan
from peftkit.config import recipe_from_dict
from peftkit.config.schema import PartialAdapterConfig, UnfreezeScheduleConfig
from peftkit.train.run import train
from tests.unit.adapters_fixtures import load_tiny, recipe_for

torch.set_num_threads(1)


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_plan_freezes_all_but_the_top_blocks_and_head(tiny_model_dir):
    model = build_adapter(load_tiny(tiny_model_dir), PartialAdapterConfig(train_last_layers=1, train_head=False))
    names = _trainable(model)
    assert names == {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")} | {"model.norm.weight"}

    head_only = build_adapter(load_tiny(tiny_model_dir), PartialAdapterConfig(train_last_layers=0, train_head=True))
    assert _trainable(head_only) == {"model.embed_tokens.weight"}  # the tied lm_head weight
    assert head_only.lm_head.weight is head_only.model.embed_tokens.weight


class Snapshots(TrainerCallback):
    """Parameter copies before training and after every optimizer step."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    @staticmethod
    def _take(model):
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.steps = [self._take(model)]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append(self._take(model))


def test_gradual_unfreezing_updates_blocks_only_after_they_unfreeze(tiny_recipe, tmp_path):
    """Later blocks are in the optimizer from the start, frozen (no update, no weight decay) until their stage."""
    recipe = recipe_for(
        tiny_recipe, "partial", tmp_path, train_last_layers=2, train_head=False, unfreeze_schedule={"every_steps": 2, "start_layers": 1}
    )
    recipe["train"].update({"max_steps": 6, "weight_decay": 0.1})
    snapshots = Snapshots()
    result = train(recipe_from_dict(recipe), extra_callbacks=[snapshots])
    summary = result.summary  # the card and summary said only the starting count
    assert summary["trainable_params_end"] > summary["trainable_params"]
    assert f"{summary['trainable_params_end']:,} at the end (gradual unfreezing)" in (result.run_dir / "README.md").read_text()
    from rich.console import Console

    from peftkit.train.report import print_run_report

    console = Console(record=True, width=400)
    print_run_report(console, result.run_dir, summary)  # the terminal's last lines too
    assert f"{summary['trainable_params_end']:,} at the end (gradual unfreezing)" in console.export_text()
    steps = snapshots.steps
    assert len(steps) == 7

    def changed(name: str, step: int) -> bool:
        return not torch.equal(steps[step][name], steps[step - 1][name])

    top, lower = "model.layers.1.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"
    embed = "model.embed_tokens.weight"
    assert all(changed(top, s) for s in range(1, 7))  # start_layers: 1
    assert not any(changed(lower, s) for s in (1, 2))  # stage 0: frozen although already in the optimizer
    assert all(changed(lower, s) for s in range(3, 7))  # unfrozen at global step 2
    assert not any(changed(embed, s) for s in range(1, 7))  # never trains (head and embeddings off)


def test_layerwise_lr_decay_param_groups(tiny_model_dir, tmp_path):
    cfg = PartialAdapterConfig(train_last_layers=2, train_head=True, layerwise_lr_decay=0.5)
    model = build_adapter(load_tiny(tiny_model_dir), cfg)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.01, use_cpu=True, report_to="none")
    optimizer = trainer_extras(model, cfg, args).optimizer
    lr_by_group: dict[str, set[float]] = {}
    for group in optimizer.param_groups:
        lr_by_group.setdefault(group["peftkit_group"], set()).add(round(group["lr"], 12))
        if any(p.ndim == 1 for p in group["params"]):  # norms: no weight decay
            assert group["weight_decay"] == 0.0
    # head (tied embeddings) and final norm at lr, top block lr*d, the next lr*d^2
    assert lr_by_group == {"head": {1e-3}, "top": {1e-3}, "block.1": {5e-4}, "block.0": {2.5e-4}}
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}


def test_a_tied_head_trained_as_embeddings_takes_the_embeddings_rate(tiny_model_dir, tmp_path):
    """train_embeddings without train_head put the shared matrix at the head's full rate, 8x the documented
    embeddings rate lr * d^(L+1) here; with train_head on, the head's rate it is."""
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, use_cpu=True, report_to="none")

    def rates(**flags) -> dict[str, set[float]]:
        cfg = PartialAdapterConfig(train_last_layers=2, layerwise_lr_decay=0.5, **flags)
        model = build_adapter(load_tiny(tiny_model_dir), cfg)
        assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.requires_grad
        found: dict[str, set[float]] = {}
        for group in trainer_extras(model, cfg, args).optimizer.param_groups:
            found.setdefault(group["peftkit_group"], set()).add(round(group["lr"], 12))
        return found

    assert rates(train_head=False, train_embeddings=True)["embeddings"] == {1.25e-4}
    assert "head" not in rates(train_head=False, train_embeddings=True)
    assert rates(train_head=True, train_embeddings=True)["head"] == {1e-3}


def test_schedule_stage_by_steps_and_epochs():
    steps = UnfreezeScheduleConfig(every_steps=10)
    epochs = UnfreezeScheduleConfig(every_epochs=2)
    assert [_stage(steps, SimpleNamespace(global_step=s, epoch=0.0)) for s in (0, 9, 10, 25)] == [0, 0, 1, 2]
    assert [_stage(epochs, SimpleNamespace(global_step=0, epoch=e)) for e in (0.0, 1.99, 2.0, 4.5)] == [0, 0, 1, 2]


def test_plan_caps_unfreezing_at_train_last_layers(tiny_model_dir):
    cfg = PartialAdapterConfig(train_last_layers=1, train_head=True, unfreeze_schedule={"every_steps": 1})
    model = build_adapter(load_tiny(tiny_model_dir), cfg)
    plan = freeze_plan(model)
    counts = []
    for stage in range(4):
        plan.apply(stage)
        counts.append(plan.trainable_count())
    assert counts[0] < counts[1] == counts[2] == counts[3]
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("model.layers.0."))


def test_output_side_modules_registered_before_the_blocks_train_with_the_top(tiny_tokenizer):
    """OPT's decoder registers `final_layer_norm` before `layers`: it still runs after the blocks, so it trains with
    them (and at the full lr), while the input embeddings stay below."""
    from transformers import OPTConfig, OPTForCausalLM

    from peftkit.adapters.modules import block_layout

    model = OPTForCausalLM(OPTConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32))
    layout = block_layout(model)
    top = {name for name, _ in layout.top}
    assert {"model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias"} <= top
    assert not any("final_layer_norm" in name for name, _ in layout.embeddings)
    assert any("embed_positions" in name for name, _ in layout.embeddings)
    trained = build_adapter(model, PartialAdapterConfig(train_last_layers=1, train_head=False))
    assert "model.decoder.final_layer_norm.weight" in _trainable(trained)


def test_a_schedule_with_no_block_to_unfreeze_is_refused(tiny_model_dir):
    from peftkit.adapters import check_targets

    cfg = PartialAdapterConfig(train_last_layers=0, train_head=True, unfreeze_schedule={"every_steps": 2})
    problems = check_targets(load_tiny(tiny_model_dir), cfg)
    assert len(problems) == 1 and "there is nothing to unfreeze" in problems[0]


def test_a_schedule_that_cannot_finish_within_the_run_is_named(tiny_model_dir, caplog):
    """quickstart-partial unfroze every 20 steps from 2 to 8 blocks over 120 steps: block 8 would have unfrozen at
    step 120, after the last step, and nothing said so."""
    from peftkit.adapters.partial import _warn_if_unfinished

    cfg = PartialAdapterConfig(train_last_layers=2, train_head=True, unfreeze_schedule={"every_steps": 3, "start_layers": 1})
    plan = freeze_plan(build_adapter(load_tiny(tiny_model_dir), cfg))
    caplog.clear()  # what building logged (at INFO, shown when an earlier test left peftkit's level there)
    with caplog.at_level("WARNING", logger="peftkit.adapters.partial"):
        _warn_if_unfinished(plan, cfg.unfreeze_schedule, SimpleNamespace(max_steps=4, num_train_epochs=1))
        assert not caplog.text, "block 2 unfreezes at step 3, the run's 4th and last"
        _warn_if_unfinished(plan, cfg.unfreeze_schedule, SimpleNamespace(max_steps=3, num_train_epochs=1))
    assert "reaches 1 of the 2 blocks of train_last_layers within the run's 3 steps: the last 1 never train" in caplog.text
    assert "every_steps: 2 or less" in caplog.text
    caplog.clear()
    by_epochs = UnfreezeScheduleConfig(every_epochs=2, start_layers=1)
    with caplog.at_level("WARNING", logger="peftkit.adapters.partial"):
        _warn_if_unfinished(plan, by_epochs, SimpleNamespace(max_steps=30, num_train_epochs=3))
        assert not caplog.text, "block 2 unfreezes at the start of epoch 3"
        _warn_if_unfinished(plan, by_epochs, SimpleNamespace(max_steps=20, num_train_epochs=2))
    assert "within the run's 2 epochs" in caplog.text and "every_epochs: 1 or less" in caplog.text


def test_validate_names_a_schedule_that_cannot_finish_once(tiny_model_dir, tiny_recipe, caplog):
    """Where the recipe alone gives the run's length (max_steps for every_steps, epochs for every_epochs), validate
    says it before any weights load; training, which says it at its first step, does not say it again."""
    from peftkit.adapters.partial import _warn_if_unfinished
    from peftkit.config.validate import _warn_about_unfreeze_schedule
    from peftkit.utils.once import command_scope

    schedule = {"every_steps": 3, "start_layers": 0}
    adapter = {"method": "partial", "train_last_layers": 2, "train_head": True, "unfreeze_schedule": schedule}

    def recipe_with(adapter: dict, **train: float):
        return recipe_from_dict({**tiny_recipe, "adapter": adapter, "train": {**tiny_recipe["train"], **train}})

    recipe = recipe_with(adapter, max_steps=4)
    with caplog.at_level("WARNING"), command_scope():
        _warn_about_unfreeze_schedule(recipe)
        assert "reaches 1 of the 2 blocks of train_last_layers within the run's 4 steps" in caplog.text
        plan = freeze_plan(build_adapter(load_tiny(tiny_model_dir), recipe.adapter))
        _warn_if_unfinished(plan, recipe.adapter.unfreeze_schedule, SimpleNamespace(max_steps=4, num_train_epochs=1))
    assert caplog.text.count("never train") == 1
    caplog.clear()
    by_epochs = {**adapter, "unfreeze_schedule": {"every_epochs": 1, "start_layers": 0}}
    with caplog.at_level("WARNING"), command_scope():
        _warn_about_unfreeze_schedule(recipe_with(by_epochs, epochs=3))
        assert not caplog.text, "blocks 1 and 2 unfreeze at epochs 2 and 3"
        _warn_about_unfreeze_schedule(recipe_with(by_epochs, epochs=2))
        assert "within the run's 2 epochs" in caplog.text
        caplog.clear()  # the length in epochs of a max_steps run is known once the data is
        _warn_about_unfreeze_schedule(recipe_with(by_epochs, max_steps=2))
        _warn_about_unfreeze_schedule(recipe_with(adapter))
    assert not caplog.text


def test_a_schedule_no_period_can_finish_names_another_fix(tiny_model_dir, caplog):
    """Every epoch from 0 of 2 blocks over 2 epochs: the advice was `every_epochs: 1 or less`, which the recipe had."""
    from peftkit.adapters.partial import _warn_if_unfinished

    cfg = PartialAdapterConfig(train_last_layers=2, train_head=True, unfreeze_schedule={"every_epochs": 1, "start_layers": 0})
    plan = freeze_plan(build_adapter(load_tiny(tiny_model_dir), cfg))
    with caplog.at_level("WARNING", logger="peftkit.adapters.partial"):
        _warn_if_unfinished(plan, cfg.unfreeze_schedule, SimpleNamespace(max_steps=10, num_train_epochs=2))
    assert "reaches 1 of the 2 blocks" in caplog.text and "every_epochs: 1 or less" not in caplog.text
    assert "start with more blocks (start_layers: 1 or more), train longer, or lower train_last_layers" in caplog.text


def test_weights_that_train_under_bf16_mixed_precision_are_kept_in_float32(tiny_model_dir):
    """bf16 AdamW steps of about lr round away on most weights; the blocks a schedule unfreezes later are cast too,
    frozen ones stay bf16, and the bf16 forward (autocast) and backward run over the mixed model."""
    from peftkit.adapters import keep_trained_weights_in_float32

    cfg = PartialAdapterConfig(train_last_layers=2, train_head=False, unfreeze_schedule={"every_steps": 2, "start_layers": 1})
    model = build_adapter(load_tiny(tiny_model_dir).to(torch.bfloat16), cfg)
    assert keep_trained_weights_in_float32(model, torch.bfloat16, "cpu", deepspeed=False) == 0  # no autocast there
    assert keep_trained_weights_in_float32(model, torch.bfloat16, "cuda", deepspeed=True) == 0  # DeepSpeed's own masters
    top = [p for name, p in model.named_parameters() if ".layers." in name or name == "model.norm.weight"]
    assert keep_trained_weights_in_float32(model, torch.bfloat16, "cuda", deepspeed=False) == sum(p.numel() for p in top)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert all(p.dtype == torch.float32 for p in top) and dtypes["model.embed_tokens.weight"] == torch.bfloat16
    assert not model.model.layers[0].self_attn.q_proj.weight.requires_grad  # cast before its stage comes
    freeze_plan(model).apply(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in top if p.requires_grad)


def test_a_model_trained_with_float32_copies_is_saved_in_bf16_under_a_config_naming_it(tiny_model_dir, tmp_path):
    """Saved as it was, the run's model mixed bf16 and float32 tensors under a config naming float32 (its first
    parameter's), which serving engines then load whole in float32; a peft model is left alone."""
    import json

    from safetensors import safe_open

    from peftkit.adapters import keep_trained_weights_in_float32, save_trained
    from peftkit.config.schema import LoraAdapterConfig

    cfg = PartialAdapterConfig(train_last_layers=1, train_head=True)
    model = build_adapter(load_tiny(tiny_model_dir).to(torch.bfloat16), cfg)
    assert keep_trained_weights_in_float32(model, torch.bfloat16, "cuda", deepspeed=False) > 0
    saved = save_trained(model, tmp_path, "partial")
    with safe_open(str(saved / "model.safetensors"), "pt") as weights:
        dtypes = {weights.get_tensor(name).dtype for name in weights.keys()}
        assert dtypes == {torch.bfloat16}
        assert torch.equal(weights.get_tensor("model.layers.1.mlp.up_proj.weight"),
                           model.model.layers[1].mlp.up_proj.weight.to(torch.bfloat16))
    assert json.loads((saved / "config.json").read_text())["dtype"] == "bfloat16"
    assert model.model.layers[1].mlp.up_proj.weight.dtype == torch.float32  # training's copy is untouched
    lora = build_adapter(load_tiny(tiny_model_dir).to(torch.bfloat16),
                         LoraAdapterConfig(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert keep_trained_weights_in_float32(lora, torch.bfloat16, "cuda", deepspeed=False) == 0
