"""Training under DeepSpeed on CPU, one process: peftkit's own optimizer groups survive, whole models are saved whole.

Each run is a subprocess (DeepSpeed starts a process group and registers a process-wide config that would leak into
later tests). The first DeepSpeed run on a clean machine builds DeepSpeed's CPU op (about 1.5 min, cached after).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.train_procs import run, subprocess_env, tail, tiny_recipe_file

STEPS = 4
TRAIN = {"max_steps": STEPS, "batch_size": 4, "lr": 1e-2, "scheduler": "linear", "warmup_ratio": 0.0,
         "weight_decay": 0.0, "save_steps": STEPS, "group_by_length": False}
PARTIAL = {"method": "partial", "train_last_layers": 2, "train_head": True, "layerwise_lr_decay": 0.5}

PROBE = '''
import json, sys
from transformers import TrainerCallback
from peftkit.config import load_recipe
from peftkit.train.run import train

class Probe(TrainerCallback):
    """The innermost optimizer's groups (name, lr, size) after steps 1 and 3, and the chain of wrappers above it."""
    def __init__(self):
        self.seen = {}
    def on_step_end(self, args, state, control, optimizer=None, **kw):
        if state.global_step in (1, 3):
            chain = [type(optimizer).__name__]
            while getattr(optimizer, "optimizer", None) is not None:
                optimizer = optimizer.optimizer
                chain.append(type(optimizer).__name__)
            groups = [[g.get("peftkit_group"), g["lr"], sum(p.numel() for p in g["params"])] for g in optimizer.param_groups]
            self.seen[state.global_step] = {"chain": chain, "groups": groups}

probe = Probe()
train(load_recipe(sys.argv[1], sys.argv[3:]), force=True, extra_callbacks=[probe])
with open(sys.argv[2], "w") as out:
    json.dump(probe.seen, out)
'''


def _train(folder: Path, model_dir: Path, adapter: dict[str, Any], *overrides: str) -> tuple[Path, dict[str, Any]]:
    """Train the tiny recipe in a subprocess; (run directory, optimizer groups seen at steps 1 and 3)."""
    recipe = tiny_recipe_file(folder, model_dir, train=TRAIN, extra={"adapter": adapter})
    script, seen = folder / "probe.py", folder / "seen.json"
    script.write_text(PROBE, encoding="utf-8")
    result = run([sys.executable, str(script), str(recipe), str(seen), *overrides], subprocess_env(folder),
                 folder / "train.log", timeout=420)
    assert result.returncode == 0, tail(folder / "train.log")
    return folder / "run", json.loads(seen.read_text())


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in _records(run_dir) if "loss" in r]


def _logged_lrs(run_dir: Path) -> list[float]:
    return [r["learning_rate"] for r in _records(run_dir) if "learning_rate" in r]


@pytest.fixture(scope="module")
def partial_plain(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return _train(tmp_path_factory.mktemp("partial-plain"), tiny_model_dir, PARTIAL)


def test_layerwise_learning_rates_survive_zero2(partial_plain, tiny_model_dir, tmp_path):
    """transformers' deepspeed_init drops an optimizer handed in with `optimizers=` and builds its default one;
    the partial method's groups (head at lr, block i of L at lr x d^(L-i), embeddings lower) must be the ones trained."""
    run_dir, seen = _train(tmp_path, tiny_model_dir, PARTIAL, "deepspeed.stage=2")
    plain_dir, plain = partial_plain
    assert "DeepSpeedZeroOptimizer" in seen["1"]["chain"]
    groups = seen["1"]["groups"]
    assert groups == plain["1"]["groups"]  # the same groups, rates and sizes as without DeepSpeed
    rates = {name: lr for name, lr, _ in groups}
    lr = TRAIN["lr"] * (1 - 1 / STEPS)  # after step 1 of the linear schedule
    assert rates["head"] == pytest.approx(lr)
    assert rates["block.1"] == pytest.approx(lr * 0.5) and rates["block.0"] == pytest.approx(lr * 0.25)
    # The scheduler scales each group from its own rate.
    later = {name: lr for name, lr, _ in seen["3"]["groups"]}
    assert later["block.0"] / later["head"] == pytest.approx(0.25) and later["head"] == pytest.approx(TRAIN["lr"] / STEPS)
    # Same training: the losses and the learning rates logged (the first group's) match the run without DeepSpeed.
    assert _losses(run_dir) == pytest.approx(_losses(plain_dir), abs=1e-4)
    assert _logged_lrs(run_dir) == pytest.approx(_logged_lrs(plain_dir)) and len(_logged_lrs(run_dir)) == STEPS


def test_loraplus_ratio_survives_zero2(tiny_model_dir, tmp_path):
    adapter = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "loraplus_lr_ratio": 16}
    _, seen = _train(tmp_path, tiny_model_dir, adapter, "deepspeed.stage=2")
    assert "DeepSpeedZeroOptimizer" in seen["1"]["chain"]
    rates = sorted({lr for _, lr, size in seen["1"]["groups"] if size})
    lr = TRAIN["lr"] * (1 - 1 / STEPS)
    assert rates == pytest.approx([lr, 16 * lr])  # A matrices at lr, B matrices at 16 x lr


def test_partial_under_zero3_saves_every_weight(tiny_model_dir, tmp_path):
    """ZeRO-3 partitions the frozen weights too: a whole-model save must gather them, not only the trainable ones."""
    from safetensors.torch import load_file

    adapter = {"method": "partial", "train_last_layers": 1, "train_head": False, "layerwise_lr_decay": 0.5}
    run_dir, seen = _train(tmp_path, tiny_model_dir, adapter, "deepspeed.stage=3")
    assert "DeepSpeedZeroOptimizer_Stage3" in seen["1"]["chain"]
    lr = TRAIN["lr"] * (1 - 1 / STEPS)
    assert {name: rate for name, rate, _ in seen["1"]["groups"]} == pytest.approx({"top": lr, "block.1": lr * 0.5})
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    for saved_file in (run_dir / "model" / "model.safetensors", *run_dir.glob("checkpoints/checkpoint-*/model.safetensors")):
        saved = load_file(str(saved_file))
        assert saved.keys() == base.keys(), saved_file
        for key, tensor in base.items():
            assert saved[key].shape == tensor.shape, (saved_file, key)
            if "layers.1." not in key and key != "model.norm.weight":  # frozen: embeddings and block 0
                torch.testing.assert_close(saved[key], tensor, msg=key)
    trained = load_file(str(run_dir / "model" / "model.safetensors"))
    assert not torch.equal(trained["model.layers.1.self_attn.q_proj.weight"], base["model.layers.1.self_attn.q_proj.weight"])
    trainable = [r["trainable_params"] for r in _records(run_dir) if "loss" in r]
    assert len(set(trainable)) == 1 and trainable[0] > 1000  # full sizes, not the ZeRO-3 partitions' empty ones


def test_prefix_projection_under_zero3_saves_the_whole_prefix(tiny_model_dir, tmp_path):
    """ZeRO-3 partitions the prefix encoder too: the adapter must hold the whole projected prefix, and no checkpoint
    a copy of the encoder's partitions (peftkit's own file, which DeepSpeed runs do not read)."""
    from safetensors.torch import load_file

    adapter = {"method": "prefix_tuning", "num_virtual_tokens": 4, "prefix_projection": True, "encoder_hidden_size": 16}
    run_dir, seen = _train(tmp_path, tiny_model_dir, adapter, "deepspeed.stage=3")
    assert "DeepSpeedZeroOptimizer_Stage3" in seen["1"]["chain"]
    config = json.loads((tiny_model_dir / "config.json").read_text())
    prefix = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    (tensor,) = prefix.values()
    kv_width = config["num_key_value_heads"] * config["hidden_size"] // config["num_attention_heads"]
    assert tensor.shape == (4, config["num_hidden_layers"] * 2 * kv_width)  # a key and a value per layer
    assert tensor.abs().sum() > 0
    assert not list(run_dir.glob("checkpoints/*/prefix_encoder.safetensors"))


# ------------------------------------------------------------------------------------------------
# Without DeepSpeed: one code path, and the pre-flight check of bitsandbytes optimizers


SWEEP = '''
import json, os, sys
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from peftkit.config import load_recipe
from peftkit.models import load_model
from peftkit.config.schema import ModelConfig
from peftkit.train.run import train

environ = dict(os.environ)
train(load_recipe(sys.argv[1], ["deepspeed.stage=3", f"output_dir={sys.argv[3]}/zero3"]), force=True)
after = {"zero3": is_deepspeed_zero3_enabled(), "environ": sorted(set(os.environ.items()) ^ set(environ.items()))}
plain = train(load_recipe(sys.argv[1], [f"output_dir={sys.argv[3]}/plain"]), force=True)
weight = load_model(ModelConfig(name=sys.argv[2])).model.layers[0].self_attn.q_proj.weight
again = train(load_recipe(sys.argv[1], ["deepspeed.stage=2", f"output_dir={sys.argv[3]}/zero2"]), force=True)
after.update(plain_loss=plain.summary["train_loss"], weight=list(weight.shape), again=again.summary["train_loss"])
print("AFTER", json.dumps(after))
'''


def test_a_zero3_train_in_a_python_process_leaves_it_as_it_was(tiny_model_dir, tmp_path):
    """A sweep or notebook that trains under ZeRO-3 and then without DeepSpeed: transformers' global ZeRO-3 config
    made every later load partitioned (empty weights, "Cannot copy out of meta tensor"), and accelerate's DeepSpeed
    environment made the next run evaluate through DeepSpeed ("ZeRO inference only makes sense with ZeRO Stage 3")."""
    recipe = tiny_recipe_file(tmp_path, tiny_model_dir, train=TRAIN)
    script = tmp_path / "sweep.py"
    script.write_text(SWEEP, encoding="utf-8")
    result = run([sys.executable, str(script), str(recipe), str(tiny_model_dir), str(tmp_path)], subprocess_env(tmp_path),
                 tmp_path / "sweep.log", timeout=420)
    assert result.returncode == 0, tail(tmp_path / "sweep.log")
    after = json.loads(next(line for line in (tmp_path / "sweep.log").read_text().splitlines()
                            if line.startswith("AFTER "))[len("AFTER "):])
    assert after["zero3"] is False and after["environ"] == [] and after["weight"] == [32, 32]
    assert after["again"] == pytest.approx(after["plain_loss"], rel=1e-4)  # a next DeepSpeed run in the same world


def test_method_optimizer_is_the_trainers_optimizer(tiny_recipe, tmp_path):
    from transformers import TrainingArguments

    from peftkit.adapters import build_adapter, trainer_extras
    from peftkit.config import recipe_from_dict
    from peftkit.train.trainer import SFTTrainer
    from tests.conftest import build_tiny_llama

    recipe = recipe_from_dict({**tiny_recipe, "adapter": {**PARTIAL, "train_last_layers": 1}})
    model = build_adapter(build_tiny_llama(64), recipe.adapter)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", learning_rate=1e-2)
    extras = trainer_extras(model, recipe.adapter, args)
    trainer = SFTTrainer(model=model, args=args, method_optimizer=extras.optimizer)
    assert trainer.optimizer is None  # not handed to the Trainer as `optimizers=`, which DeepSpeed would drop
    assert trainer.create_optimizer() is extras.optimizer
    assert SFTTrainer(model=model, args=args).create_optimizer() is not extras.optimizer  # the Trainer's default


def test_accelerates_accumulation_warning_is_dropped(caplog):
    """With train.grad_accum > 1 accelerate warns at every DeepSpeed start that its plugin has 1 step; harmless."""
    from peftkit.train import deepspeed as ds

    ds._quiet_accumulation_warning()
    ds._quiet_accumulation_warning()  # installed once
    logger = logging.getLogger("accelerate.accelerator")
    assert sum(isinstance(f, ds._AccumulationWarning) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger="accelerate.accelerator"):
        logger.warning("[RANK 0] Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1, DeepSpeed "
                       "config has 2. Using DeepSpeed's value.")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_recipe_file_helper_writes_the_adapter(tiny_model_dir, tmp_path):
    """The helper above replaces the recipe's adapter section (guards the tests against silently training LoRA)."""
    recipe = tiny_recipe_file(tmp_path, tiny_model_dir, train=TRAIN, extra={"adapter": PARTIAL})
    assert yaml.safe_load(recipe.read_text())["adapter"] == PARTIAL
