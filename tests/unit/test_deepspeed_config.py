"""DeepSpeed config generation and validation, the launcher command lines, and stale build locks.

Everything here runs without starting DeepSpeed: configs are checked against transformers'
own `HfTrainerDeepSpeedConfig` (the code that fills "auto" and rejects mismatches at launch).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from peftkit.config import load_recipe, recipe_from_dict
from peftkit.config.validate import validate_recipe
from peftkit.errors import ConfigError
from peftkit.train import deepspeed as ds
from peftkit.train.launch import LaunchOptions, launcher_command, load_train_recipe


def _recipe(tiny_recipe, **changes):
    data = {**tiny_recipe, **changes}
    return recipe_from_dict(data)


@pytest.fixture
def hf_ds_config():
    """transformers' Trainer-side DeepSpeed config, unregistered afterwards (it is a process-wide global
    that would turn later from_pretrained calls into ZeRO-3 loads)."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    made = []

    def make(config):
        made.append(HfTrainerDeepSpeedConfig(config))
        return made[-1]

    yield make
    made.clear()
    unset_hf_deepspeed_config()


def _training_args(recipe, tmp_path):
    """The TrainingArguments the run would build (DeepSpeed itself left out: it would start a process group)."""
    from peftkit.train.run import training_arguments

    return training_arguments(recipe.model_copy(update={"deepspeed": None}), tmp_path, "cpu", torch.float32, True)


def test_generated_config_follows_the_train_section(tiny_recipe):
    train = {**tiny_recipe["train"], "batch_size": 3, "grad_accum": 5, "max_grad_norm": 0.7}
    recipe = _recipe(tiny_recipe, train=train, deepspeed={"stage": 2})
    config = ds.build_config(recipe, "cpu", torch.float32)
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 5
    assert config["gradient_clipping"] == 0.7
    assert config["train_batch_size"] == "auto"  # world size is only known at launch
    assert config["bf16"] == {"enabled": False} and config["fp16"] == {"enabled": False}  # float32 on CPU
    assert config["zero_optimization"] == {"stage": 2, "contiguous_gradients": True, "reduce_bucket_size": "auto"}
    assert "optimizer" not in config and config["zero_allow_untested_optimizer"] is True  # torch AdamW: no fused_adam build
    assert ds.training_kwargs(recipe, "cpu", torch.float32, world_size=2)["ddp_backend"] == "gloo"


def test_generated_config_is_accepted_by_the_trainer_integration(tiny_recipe, tmp_path, hf_ds_config):
    train = {**tiny_recipe["train"], "batch_size": 3, "grad_accum": 2, "max_steps": 10}
    recipe = _recipe(tiny_recipe, train=train, deepspeed={"stage": 3})
    args = _training_args(recipe, tmp_path)
    hf = hf_ds_config(ds.build_config(recipe, "cpu", torch.float32))
    hf.trainer_config_process(args)
    hf.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=32)), num_training_steps=10)
    assert hf.mismatches == []
    zero = hf.config["zero_optimization"]
    assert hf.config["train_batch_size"] == 6 and zero["reduce_bucket_size"] == 32 * 32
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 32 * 32) and zero["stage3_param_persistence_threshold"] == 320
    assert hf.dtype() == torch.float32


def test_mismatched_json_is_what_the_trainer_would_reject(tiny_recipe, tmp_path, hf_ds_config):
    """The validation check mirrors the Trainer's: a value it rejects at launch is rejected before loading."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}))
    recipe = _recipe(tiny_recipe, deepspeed=str(path))
    hf = hf_ds_config(ds.build_config(recipe, "cpu", torch.float32))
    hf.trainer_config_process(_training_args(recipe, tmp_path))
    assert hf.mismatches  # transformers would raise at launch, after the weights loaded ...
    problems = ds.check_deepspeed(recipe, "cpu")  # ... peftkit says so before
    assert any("train_micro_batch_size_per_gpu=2 but train.batch_size is 4" in p for p in problems)


def test_json_leaving_out_train_settings_gets_the_recipes(tiny_recipe, tmp_path, hf_ds_config):
    """A key the JSON leaves out would be DeepSpeed's default, not the recipe's: no gradient clipping (a silently
    200x larger update), no micro batch (an AssertionError once the model has loaded), fp32."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    train = {**tiny_recipe["train"], "batch_size": 3, "grad_accum": 2, "max_grad_norm": 0.001}
    recipe = _recipe(tiny_recipe, train=train, deepspeed=str(path))
    assert ds.check_deepspeed(recipe, "cpu") == []
    hf = hf_ds_config(ds.build_config(recipe, "cpu", torch.float32))
    hf.trainer_config_process(_training_args(recipe, tmp_path))
    assert hf.mismatches == []
    assert (hf.config["gradient_clipping"], hf.config["train_micro_batch_size_per_gpu"],
            hf.config["gradient_accumulation_steps"], hf.config["train_batch_size"]) == (0.001, 3, 2, 6)
    assert hf.config["bf16"] == {"enabled": False} and hf.config["fp16"] == {"enabled": False}
    own = json.loads(path.read_text())
    own.update(gradient_clipping=0.5, bf16={"loss_scale": 0})  # the user's values stay
    path.write_text(json.dumps(own))
    config = ds.build_config(recipe, "cpu", torch.float32)
    assert config["gradient_clipping"] == 0.5 and config["bf16"] == {"loss_scale": 0, "enabled": "auto"}
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bfloat16": {"enabled": True}}))  # the older name
    assert "bf16" not in ds.build_config(recipe, "cpu", torch.float32)
    assert [p for p in ds.check_deepspeed(recipe, "cpu") if "enables bf16 but this run does not use bf16" in p]


def test_json_optimizer_values_that_contradict_the_recipe_are_refused_before_loading(tiny_recipe, tmp_path, hf_ds_config):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2},
                                "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "weight_decay": "auto"}},
                                "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 0.1}}}))
    recipe = _recipe(tiny_recipe, deepspeed=str(path))
    hf = hf_ds_config(ds.build_config(recipe, "cpu", torch.float32))
    hf.trainer_config_process(_training_args(recipe, tmp_path))
    assert len(hf.mismatches) == 2  # what transformers would raise at launch, after the weights loaded
    problems = ds.check_deepspeed(recipe, "cpu")
    assert [p for p in problems if "optimizer.params.lr=0.1 but train.lr" in p]
    assert [p for p in problems if "defines a `scheduler` (WarmupLR), which would replace train.scheduler (cosine)" in p]
    assert not [p for p in problems if "weight_decay" in p]


def test_gpu_config_uses_bf16_nccl_and_pinned_offload(tiny_recipe, tmp_path, hf_ds_config):
    recipe = _recipe(tiny_recipe, deepspeed={"stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"})
    config = ds.build_config(recipe, "cuda", torch.bfloat16)
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    zero = config["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert config["zero_force_ds_cpu_optimizer"] is False
    assert ds.training_kwargs(recipe, "cuda", torch.bfloat16, world_size=8)["ddp_backend"] == "nccl"
    # What TrainingArguments sets on a bf16 GPU (run.training_arguments: bf16=dtype is bf16 and not CPU).
    cpu_args = _training_args(recipe, tmp_path)
    gpu_args = SimpleNamespace(**{**vars(cpu_args), "bf16": True, "world_size": 8})
    hf = hf_ds_config(config)
    hf.trainer_config_process(gpu_args)
    assert hf.mismatches == [] and hf.dtype() == torch.bfloat16 and hf.config["train_batch_size"] == 8 * 4
    fp16 = ds.build_config(recipe, "cuda", torch.float16)
    assert fp16["fp16"] == {"enabled": True} and fp16["bf16"] == {"enabled": False}


def test_stage3_gathers_on_save_and_extra_keys_merge(tiny_recipe):
    recipe = _recipe(tiny_recipe, deepspeed={
        "stage": 3, "overlap_comm": True, "extra": {"zero_optimization": {"sub_group_size": 1000}, "steps_per_print": 5},
    })
    config = ds.build_config(recipe, "cpu", torch.float32)
    zero = config["zero_optimization"]
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["overlap_comm"] is True and zero["sub_group_size"] == 1000 and zero["stage"] == 3
    assert config["steps_per_print"] == 5


def test_invalid_combinations_are_all_reported_before_loading(tiny_recipe):
    recipe = _recipe(tiny_recipe, deepspeed={"stage": 2, "offload_params": "cpu", "offload_optimizer": "nvme"})
    with pytest.raises(ConfigError) as info:
        validate_recipe(recipe, check_model=False)
    problems = info.value.problems
    assert any("offload_params: cpu needs stage 3" in p for p in problems)
    assert any("nvme offload needs deepspeed.nvme_path" in p for p in problems)
    assert len(problems) == 2
    stage0 = _recipe(tiny_recipe, deepspeed={"stage": 0, "offload_optimizer": "cpu"})
    assert any("needs stage 1, 2 or 3" in p for p in ds.check_deepspeed(stage0, "cpu"))
    missing_dir = _recipe(tiny_recipe, deepspeed={"stage": 3, "offload_params": "nvme", "nvme_path": "/no/such/nvme"})
    assert any("/no/such/nvme is not a directory" in p for p in ds.check_deepspeed(missing_dir, "cpu"))
    fine = _recipe(tiny_recipe, deepspeed={"stage": 3, "offload_params": "cpu", "offload_optimizer": "cpu"})
    assert ds.check_deepspeed(fine, "cpu") == []


def test_schema_errors_name_the_deepspeed_key(tiny_recipe):
    with pytest.raises(ConfigError, match="unknown key `deepspeed.stag`: did you mean `stage`"):
        _recipe(tiny_recipe, deepspeed={"stag": 2})
    with pytest.raises(ConfigError, match="`deepspeed.stage`: Input should be 0, 1, 2 or 3"):
        _recipe(tiny_recipe, deepspeed={"stage": 4})
    with pytest.raises(ConfigError, match="mapping of ZeRO settings .* or the path of a DeepSpeed JSON"):
        _recipe(tiny_recipe, deepspeed=2)


def test_json_config_problems(tiny_recipe, tmp_path):
    missing = _recipe(tiny_recipe, deepspeed=str(tmp_path / "nope.json"))
    assert ds.check_deepspeed(missing, "cpu") == [f"deepspeed: the DeepSpeed config file {tmp_path / 'nope.json'} does not exist (check the path)"]
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert "is not valid JSON" in ds.check_deepspeed(_recipe(tiny_recipe, deepspeed=str(broken)), "cpu")[0]
    bf16 = tmp_path / "bf16.json"
    bf16.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1, "offload_param": {"device": "cpu"}}}))
    problems = ds.check_deepspeed(_recipe(tiny_recipe, deepspeed=str(bf16)), "cpu")
    assert any("enables bf16 but this run does not use bf16 on cpu" in p for p in problems)
    assert any("offload_param needs ZeRO stage 3" in p for p in problems)
    gpu_bf16 = _recipe(tiny_recipe, deepspeed=str(bf16), train={**tiny_recipe["train"], "dtype": "bfloat16"})
    assert not any("enables bf16" in p for p in ds.check_deepspeed(gpu_bf16, "cuda"))  # right on a bf16 GPU


def test_extra_keys_get_the_checks_a_json_file_gets(tiny_recipe, tmp_path, hf_ds_config):
    """`deepspeed.extra` is merged over the generated config: a value there that the Trainer would reject at launch
    (after the model loaded, in every rank) is a recipe problem, as in a JSON file."""
    train = {**tiny_recipe["train"], "batch_size": 2, "grad_accum": 2}
    extra = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 4, "gradient_clipping": 0.5,
             "bf16": {"enabled": True}, "train_batch_size": 6}
    recipe = _recipe(tiny_recipe, train=train, deepspeed={"stage": 2, "extra": extra})
    hf = hf_ds_config(ds.build_config(recipe, "cpu", torch.float32))
    hf.trainer_config_process(_training_args(recipe, tmp_path))
    assert len(hf.mismatches) == 5  # transformers rejects every one of them at launch
    problems = ds.check_deepspeed(recipe, "cpu")
    fix = "remove it from deepspeed.extra (peftkit writes the right value)"
    assert problems == [
        f"deepspeed.extra sets train_micro_batch_size_per_gpu=16 but train.batch_size is 2: {fix}",
        f"deepspeed.extra sets gradient_accumulation_steps=4 but train.grad_accum is 2: {fix}",
        f"deepspeed.extra sets gradient_clipping=0.5 but train.max_grad_norm is 1.0: {fix}",
        "deepspeed.extra sets train_batch_size=6, which is not a multiple of train.batch_size 2 x train.grad_accum 2 "
        f"(it must be that times the number of processes): {fix}",
        f"deepspeed.extra enables bf16 but this run does not use bf16 on cpu (train.dtype: auto); {fix}",
    ]
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=16"):
        validate_recipe(recipe, check_model=False)
    # "auto" and matching values are fine; so are DeepSpeed keys peftkit does not set.
    fine = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": "auto", "train_batch_size": 8,
            "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2, "sub_group_size": 1000}}
    assert ds.check_deepspeed(_recipe(tiny_recipe, train=train, deepspeed={"stage": 2, "extra": fine}), "cpu") == []


def test_misspelt_deepspeed_keys_are_named_before_the_model_loads(tiny_recipe, tmp_path):
    """DeepSpeed ignores an unknown top-level key (`zero_optimisation` ran stage 0) and refuses a ZeRO one only once
    the model is loaded; a key it does not know and that is close to none of its settings is left alone."""
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimisation": {"stage": 3}, "bf16": {"enabledd": True}, "my_note": 1,
                                  "gradient_clipping": 1.0}))
    assert ds.check_deepspeed(_recipe(tiny_recipe, deepspeed=str(config)), "cpu") == [
        f"deepspeed: {config}: `zero_optimisation` is no DeepSpeed setting (DeepSpeed would ignore it); did you mean "
        "`zero_optimization`?",
        f"deepspeed: {config}: `bf16.enabledd` is no DeepSpeed setting (DeepSpeed would ignore it); did you mean `bf16.enabled`?"]
    extra = {"zero_optimization": {"overlap_com": True, "stage3_max_live_parameters": 10**9}}
    assert ds.check_deepspeed(_recipe(tiny_recipe, deepspeed={"stage": 3, "extra": extra}), "cpu") == [
        "deepspeed.extra: `zero_optimization.overlap_com` is no ZeRO setting of DeepSpeed; did you mean `overlap_comm`?"]


def test_a_stage_in_extra_must_be_the_blocks_stage(tiny_recipe):
    """DeepSpeed would run the stage in `extra` while peftkit's stage-3 handling follows `deepspeed.stage`."""
    other = _recipe(tiny_recipe, deepspeed={"stage": 2, "extra": {"zero_optimization": {"stage": 3}}})
    assert ds.check_deepspeed(other, "cpu") == [
        "deepspeed.extra sets zero_optimization.stage=3 but deepspeed.stage is 2: set the stage with deepspeed.stage "
        "only, and remove it from deepspeed.extra"]
    same = _recipe(tiny_recipe, deepspeed={"stage": 3, "extra": {"zero_optimization": {"stage": 3}}})
    assert ds.check_deepspeed(same, "cpu") == []
    offload = {"zero_optimization": {"offload_param": {"device": "cpu"}}}
    assert ds.check_deepspeed(_recipe(tiny_recipe, deepspeed={"stage": 2, "extra": offload}), "cpu") == [
        "deepspeed.extra: offload_param needs ZeRO stage 3 (only stage 3 partitions parameters)"]
    assert ds.check_deepspeed(_recipe(tiny_recipe, deepspeed={"stage": 3, "extra": offload}), "cpu") == []


def test_train_batch_size_is_checked_against_the_processes(tiny_recipe, tmp_path, monkeypatch):
    """train_batch_size = processes x batch x accumulation: `validate` does not know the processes (a value that fits
    none is refused); the launch and each process do, before the model loads."""
    from peftkit.train.launch import LaunchOptions, launch

    path = tmp_path / "tbs.json"
    path.write_text(json.dumps({"train_batch_size": 16, "zero_optimization": {"stage": 2}}))
    recipe = _recipe(tiny_recipe, deepspeed=str(path))  # batch 4, accumulation 1
    assert ds.check_deepspeed(recipe, "cpu") == []  # 4 processes would fit
    assert ds.world_size_problems(recipe, 4) == []
    assert ds.world_size_problems(recipe, 2) == [
        f"deepspeed: {path} sets train_batch_size=16 but this run trains 2 process(es) x train.batch_size 4 x "
        "train.grad_accum 1 = 8 examples per step: set it to \"auto\""]
    path.write_text(json.dumps({"train_batch_size": 6}))
    assert "not a multiple of train.batch_size 4" in ds.check_deepspeed(recipe, "cpu")[0]
    path.write_text(json.dumps({"train_batch_size": 16}))
    args = argparse.Namespace(resume=None, force=False, overrides=[], deepspeed=None, verbose=False)
    with pytest.raises(ConfigError, match="2 process"):
        launch(args, recipe, "r.yaml", LaunchOptions(nproc=2), console=None)
    assert not Path(recipe.output_dir).exists()  # refused before anything was prepared
    # One process (`peftkit train` without a launcher): refused by setup, which runs before the model loads.
    monkeypatch.setattr(ds, "prepare_process", lambda device: None)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match="1 process"):
        ds.setup(recipe, "cpu", torch.float32)


def test_json_config_is_completed_and_resolved_next_to_the_recipe(tiny_recipe, tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "z3.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
    }))
    (folder / "r.yaml").write_text(yaml.safe_dump({**tiny_recipe, "deepspeed": "z3.json"}))
    recipe = load_recipe(folder / "r.yaml")
    assert recipe.deepspeed == str(folder / "z3.json")
    config = ds.build_config(recipe, "cpu", torch.float32)
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert config["optimizer"]["params"]["torch_adam"] is True  # no 2.5 min fused_adam build on CPU
    assert ds.zero_stage(recipe) == 3
    assert ds.check_deepspeed(recipe, "cpu") == []


def test_quantization_with_zero3(tiny_recipe):
    from peftkit.models.load import bnb_config

    qlora = {**tiny_recipe["adapter"], "method": "qlora"}
    eight_bit = _recipe(tiny_recipe, adapter=qlora, quantization={"bits": 8}, deepspeed={"stage": 3})
    assert any("8-bit quantization is not supported" in p for p in ds.check_deepspeed(eight_bit, "cpu"))
    four_bit = _recipe(tiny_recipe, adapter=qlora, deepspeed={"stage": 3})
    assert ds.check_deepspeed(four_bit, "cpu") == []
    assert ds.quant_storage_dtype(four_bit, torch.float32) == torch.float32
    assert ds.quant_storage_dtype(four_bit, torch.bfloat16) == torch.bfloat16
    assert ds.quant_storage_dtype(_recipe(tiny_recipe, adapter=qlora, deepspeed={"stage": 2}), torch.float32) is None
    assert ds.quant_storage_dtype(_recipe(tiny_recipe, adapter=qlora), torch.float32) is None
    from peftkit.config.schema import QuantizationConfig

    assert bnb_config(QuantizationConfig(), "cpu", torch.float32, torch.float32).bnb_4bit_quant_storage == torch.float32
    assert bnb_config(QuantizationConfig(), "cpu", torch.float32).bnb_4bit_quant_storage == torch.uint8


def test_an_fp16_zero3_qlora_run_with_modules_to_save_stores_its_4_bit_weights_in_fp16(tiny_recipe, monkeypatch):
    """Its weights load in float32 (fp16's GradScaler needs float32 gradients for modules_to_save), but DeepSpeed's
    fp16 engine casts every float32 parameter to fp16, the packed 4-bit bytes too: stored as float32 they came out
    as half as many values, and the first forward failed."""
    from peftkit.train import run as run_module

    seen = {}

    def load_model(*args, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # enough: what the base would be loaded with

    qlora = {**tiny_recipe["adapter"], "method": "qlora", "modules_to_save": ["lm_head"]}
    recipe = _recipe(tiny_recipe, adapter=qlora, deepspeed={"stage": 3}, eval={"before": False})
    monkeypatch.setattr(run_module, "resolve_dtype", lambda preference, device: torch.float16)  # a T4 / V100
    monkeypatch.setattr(run_module, "load_model", load_model)
    monkeypatch.setattr(ds, "prepare_process", lambda device: None)  # no process group or CPU op needed here
    with pytest.raises(KeyboardInterrupt):
        run_module.train(recipe)
    assert seen["dtype"] == torch.float32 and seen["quant_storage"] == torch.float16


# ------------------------------------------------------------------------------------------------
# CLI flags and launcher command lines


def _args(recipe: Path, **kw) -> argparse.Namespace:
    return argparse.Namespace(recipe=str(recipe), overrides=kw.pop("overrides", []), resume=kw.pop("resume", None),
                              force=False, deepspeed=kw.pop("deepspeed", None), **kw)


def test_deepspeed_flag_and_run_dir_argument(tiny_recipe, tmp_path, monkeypatch):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    recipe, _ = load_train_recipe(_args(path, deepspeed="3"))
    assert recipe.deepspeed.stage == 3
    (tmp_path / "ds.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    recipe, _ = load_train_recipe(_args(path, deepspeed="ds.json"))
    assert recipe.deepspeed == str(tmp_path / "ds.json")
    # A stage replaces a recipe's JSON path (it has no `stage` to set), and keeps the rest of a block.
    (tmp_path / "json.yaml").write_text(yaml.safe_dump({**tiny_recipe, "deepspeed": "ds.json"}))
    recipe, _ = load_train_recipe(_args(tmp_path / "json.yaml", deepspeed="2"))
    assert recipe.deepspeed.stage == 2 and recipe.deepspeed.offload_optimizer == "none"
    recipe, _ = load_train_recipe(_args(path, deepspeed="2", overrides=["deepspeed=ds.json"]))
    assert recipe.deepspeed.stage == 2
    (tmp_path / "block.yaml").write_text(yaml.safe_dump({**tiny_recipe, "deepspeed": {"stage": 2, "offload_optimizer": "cpu"}}))
    recipe, _ = load_train_recipe(_args(tmp_path / "block.yaml", deepspeed="3"))
    assert recipe.deepspeed.stage == 3 and recipe.deepspeed.offload_optimizer == "cpu"
    run_dir = tmp_path / "old-run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({**tiny_recipe, "output_dir": "somewhere/else"}))
    recipe, _ = load_train_recipe(_args(run_dir))
    assert Path(recipe.output_dir) == run_dir  # a run directory resumes in place


def test_launcher_command_lines():
    worker = ["train", "/r.yaml"]
    single = launcher_command(LaunchOptions(nproc=2), worker)
    assert single[1:4] == ["-m", "torch.distributed.run", "--nproc-per-node"] and "--standalone" in single
    assert single[-4:] == ["-m", "peftkit.cli", "train", "/r.yaml"]
    assert "SIGINT" not in single[single.index("--signals-to-handle") + 1]  # Ctrl-C comes from peftkit, once
    multi = launcher_command(LaunchOptions(nproc=8, nnodes=2, node_rank=1, master_addr="10.0.0.1"), worker)
    assert "--standalone" not in multi
    for flag, value in (("--nnodes", "2"), ("--node-rank", "1"), ("--master-addr", "10.0.0.1"), ("--master-port", "29500")):
        assert multi[multi.index(flag) + 1] == value
    hostfile = launcher_command(LaunchOptions(nproc=4, hostfile="/etc/hosts"), worker)
    assert hostfile[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert hostfile[hostfile.index("--hostfile") + 1] == "/etc/hosts" and "--no_local_rank" in hostfile
    assert hostfile[hostfile.index("--module") + 1] == "peftkit.cli"
    # DeepSpeed finds the first host's address itself; 127.0.0.1 would point every other node at itself.
    assert "--master_addr" not in hostfile
    given = launcher_command(LaunchOptions(nproc=4, hostfile="/etc/hosts", master_addr="10.0.0.1"), worker)
    assert given[given.index("--master_addr") + 1] == "10.0.0.1"
    local = launcher_command(LaunchOptions(nproc=2, launcher="deepspeed"), worker)
    assert local[local.index("--master_addr") + 1] == "127.0.0.1"  # one node: DeepSpeed needs an address


def test_the_deepspeed_launcher_on_several_nodes_needs_a_hostfile(tmp_path):
    """It starts every node from the first over ssh: without a hostfile its runner refused --num_nodes with
    --include, or found "no extra nodes available", after the launch had begun."""
    options = LaunchOptions(nproc=8, nnodes=2, node_rank=0, master_addr="10.0.0.1", launcher="deepspeed")
    assert any("--launcher deepspeed --nnodes > 1 needs --hostfile" in p for p in options.problems())
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    assert LaunchOptions(nproc=8, nnodes=2, hostfile=str(hostfile), launcher="deepspeed").problems() == []
    assert LaunchOptions(nproc=8, nnodes=2, node_rank=1, master_addr="10.0.0.1").problems() == []  # torchrun


def test_the_deepspeed_launcher_keeps_cuda_visible_devices(monkeypatch):
    """DeepSpeed's --num_gpus N means GPUs 0..N-1 and overrides CUDA_VISIBLE_DEVICES; --include keeps the choice."""
    worker = ["train", "/r.yaml"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5")
    cmd = launcher_command(LaunchOptions(nproc=2, launcher="deepspeed"), worker)
    assert cmd[cmd.index("--include") + 1] == "localhost:2,3" and "--num_gpus" not in cmd
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    cmd = launcher_command(LaunchOptions(nproc=2, launcher="deepspeed"), worker)
    assert cmd[cmd.index("--num_gpus") + 1] == "2" and "--include" not in cmd


def test_other_nodes_get_peftkits_environment_through_a_deepspeed_env_file(tmp_path, monkeypatch):
    from deepspeed.launcher.multinode_runner import PDSHRunner

    from peftkit.train.launch import deepspeed_env_file

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DS_ENV_FILE", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the file the launcher deletes after the run stays here
    (tmp_path / ".deepspeed_env").write_text("NCCL_IB_DISABLE=1\n\n")  # the user's own file is kept
    env = {"PEFTKIT_WORKER": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": "/data/hf cache", "OMP_NUM_THREADS": "4",
           "SECRET_UNRELATED": "x", "PATH": "/usr/bin"}
    path = deepspeed_env_file(env)
    assert path.stat().st_mode & 0o077 == 0  # private: it may carry HF_TOKEN
    runner = PDSHRunner(argparse.Namespace(launcher_args="", user_script="x", user_args=[]), "world-info")
    for line in path.read_text().splitlines():  # as DeepSpeed's runner reads it
        key, value = line.split("=", maxsplit=1)
        runner.add_export(key, value)
    assert runner.exports == {"NCCL_IB_DISABLE": "1", "HF_HOME": '"/data/hf cache"', "HF_HUB_OFFLINE": "1",
                              "OMP_NUM_THREADS": "4", "PEFTKIT_WORKER": "1"}


def test_launch_option_problems(tmp_path):
    assert LaunchOptions(nproc=2).problems() == []
    assert "needs --master-addr" in LaunchOptions(nnodes=2).problems()[0]
    assert "--node-rank must be in 0..1" in LaunchOptions(nnodes=2, node_rank=2, master_addr="h").problems()[0]
    assert "does not exist" in LaunchOptions(hostfile=str(tmp_path / "missing")).problems()[0]
    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=2\n")
    assert "DeepSpeed launcher" in LaunchOptions(hostfile=str(hosts), launcher="torchrun").problems()[0]
    hosts.write_text("# workers\n\na slots=2\nb  slots=4\n")
    assert LaunchOptions(hostfile=str(hosts)).problems() == []
    for text, said in (("a slots=two\n", "'a slots=two' is not a `hostname slots=N` line"),
                       ("# none yet\n\n", "lists no hosts"), ("a slots=2\na slots=2\n", "lists a more than once")):
        hosts.write_text(text)
        assert [p for p in LaunchOptions(hostfile=str(hosts)).problems() if said in p]
    assert "--master-port must be a port number" in LaunchOptions(nproc=2, master_port=99999).problems()[0]


# ------------------------------------------------------------------------------------------------
# Build locks left by killed builds


HOLD_LOCK = """
import sys, time
from torch.utils.file_baton import FileBaton
baton = FileBaton(sys.argv[1])
assert baton.try_acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_lock_left_by_a_killed_build_is_reported_not_waited_on(tmp_path):
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        assert ds.lock_holders(lock) == [holder.pid]
        ds.check_extension_locks(tmp_path, max_age_minutes=0)  # a live builder holds it: not stale
    finally:
        holder.send_signal(signal.SIGKILL)  # killed mid-"build": torch never removes the lock
        holder.wait(timeout=30)
    assert lock.exists() and ds.lock_holders(lock) == []
    with pytest.raises(ds.ExtensionLockError) as info:
        ds.check_extension_locks(tmp_path, max_age_minutes=0)
    assert f"rm {lock}" in str(info.value) and str(lock.parent) in str(info.value)
    ds.check_extension_locks(tmp_path, max_age_minutes=5)  # younger than N minutes: maybe another node's build
    old = time.time() - 600
    os.utime(lock, (old, old))
    with pytest.raises(ds.ExtensionLockError, match="10 min old"):
        ds.check_extension_locks(tmp_path, max_age_minutes=5)


def test_waiting_for_a_lock_ends_with_an_error_once_it_is_stale(tmp_path, monkeypatch):
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.write_text("")
    started = time.monotonic()
    with pytest.raises(ds.ExtensionLockError):
        ds.wait_for_extension_locks(tmp_path, max_age_minutes=0.02, poll_s=0.1)
    assert time.monotonic() - started < 10
    # The run-time entry point raises before importing DeepSpeed or building anything.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv(ds.LOCK_MINUTES_ENV, "0")
    with pytest.raises(ds.ExtensionLockError, match="Delete it"):
        ds.ensure_cpu_ops_built()


def test_waiting_returns_when_the_builder_finishes(tmp_path):
    from torch.utils.file_baton import FileBaton

    lock = tmp_path / "op" / "lock"
    lock.parent.mkdir()
    baton = FileBaton(str(lock))
    assert baton.try_acquire()  # this process is the live builder
    import threading

    threading.Timer(0.5, baton.release).start()
    ds.wait_for_extension_locks(tmp_path, max_age_minutes=0, poll_s=0.1)
    assert not lock.exists()


def test_extensions_dir_is_per_user_and_per_torch_build(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path))
    path = ds.extensions_dir()
    assert path.parent == tmp_path / "torch_extensions"
    assert torch.__version__.split("+")[0] in path.name and f"py{sys.version_info.major}{sys.version_info.minor}" in path.name
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))  # another environment: its own build folder
    assert ds.extensions_dir().parent == path.parent and ds.extensions_dir() != path
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/x/y")
    assert ds.extensions_dir() == Path("/x/y")


def test_nvme_offload_without_async_io_stops_before_loading(tiny_recipe, tmp_path, monkeypatch):
    recipe = _recipe(tiny_recipe, deepspeed={"stage": 3, "offload_params": "nvme", "nvme_path": str(tmp_path)})
    assert ds.check_deepspeed(recipe, "cpu") == []
    assert ds.uses_nvme(ds.build_config(recipe, "cpu", torch.float32))
    monkeypatch.setattr(ds, "prepare_process", lambda device: None)
    monkeypatch.setattr(ds, "async_io_available", lambda: False)
    with pytest.raises(ds.PeftkitError, match="libaio"):
        ds.setup(recipe, "cpu", torch.float32)
    assert not ds.uses_nvme(ds.build_config(_recipe(tiny_recipe, deepspeed={"stage": 3}), "cpu", torch.float32))


def test_deepspeed_optimizer_block_is_refused_where_peftkit_brings_its_own(tiny_recipe, tmp_path):
    """LoRA+ and partial fine-tuning hand the Trainer their own parameter groups; a DeepSpeed
    `optimizer` block would silently replace them (or fail at the first step)."""
    ds_json = tmp_path / "z2.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}))
    loraplus = {**tiny_recipe["adapter"], "loraplus_lr_ratio": 16}
    problems = ds.check_deepspeed(_recipe(tiny_recipe, adapter=loraplus, deepspeed=str(ds_json)), "cpu")
    assert problems == ["deepspeed: the config defines an `optimizer` but adapter.loraplus_lr_ratio (LoRA+) needs "
                        "peftkit's own optimizer (its parameter groups): remove the DeepSpeed `optimizer` block"]
    extra = {"stage": 2, "extra": {"optimizer": {"type": "AdamW"}}}
    partial = {"method": "partial", "train_last_layers": 1}
    assert "adapter.method: partial" in ds.check_deepspeed(_recipe(tiny_recipe, adapter=partial, deepspeed=extra), "cpu")[0]
    # DeepSpeed's schedulers give every group the same learning rate.
    scheduler = {"stage": 2, "extra": {"scheduler": {"type": "WarmupLR"}}}
    assert "defines a `scheduler`" in ds.check_deepspeed(_recipe(tiny_recipe, adapter=loraplus, deepspeed=scheduler), "cpu")[0]
    # Without one: transformers hands the schedule to DeepSpeed (WarmupLR: constant after a log warm-up), while the
    # recipe, summary and model card say cosine.
    assert ds.check_deepspeed(_recipe(tiny_recipe, deepspeed=scheduler), "cpu") == [
        "deepspeed: the config defines a `scheduler` (WarmupLR), which would replace train.scheduler (cosine) and "
        "train.warmup_ratio, while the run's recipe, summary and model card name the recipe's: remove the DeepSpeed "
        "`scheduler` block and choose the schedule with train.scheduler and train.warmup_ratio"]
    # DoRA with weight decay: DeepSpeed's optimizer would decay the magnitude vectors the Trainer's leaves out.
    dora = {**tiny_recipe["adapter"], "use_dora": True}
    decayed = {**tiny_recipe, "train": {**tiny_recipe["train"], "weight_decay": 0.1}}
    assert "DoRA's magnitude vectors too" in ds.check_deepspeed(_recipe(decayed, adapter=dora, deepspeed=str(ds_json)), "cpu")[0]
    assert ds.check_deepspeed(_recipe(tiny_recipe, adapter=dora, deepspeed=str(ds_json)), "cpu") == []  # no decay
    # Without an optimizer block, or with plain LoRA, nothing to report.
    assert ds.check_deepspeed(_recipe(tiny_recipe, adapter=loraplus, deepspeed={"stage": 2}), "cpu") == []
    assert ds.check_deepspeed(_recipe(tiny_recipe, deepspeed=str(ds_json)), "cpu") == []
    # train.optimizer and a DeepSpeed optimizer block both choose one
    eight_bit = _recipe(tiny_recipe, deepspeed=str(ds_json), train={**tiny_recipe["train"], "optimizer": "adamw_8bit"})
    assert ds.check_deepspeed(eight_bit, "cpu") == [
        "train.optimizer is adamw_8bit but the DeepSpeed config defines an `optimizer` too: keep one of them"]


def test_combinations_that_cannot_train_under_deepspeed_or_ddp_are_refused(tiny_recipe):
    from peftkit.train.launch import LaunchError, LaunchOptions, launch

    offloaded = _recipe(tiny_recipe, train={**tiny_recipe["train"], "optimizer": "paged_adamw_8bit"},
                        deepspeed={"stage": 2, "offload_optimizer": "cpu"})
    assert any("bitsandbytes GPU optimizer" in p for p in ds.check_deepspeed(offloaded, "cpu"))
    on_gpu = _recipe(tiny_recipe, train={**tiny_recipe["train"], "optimizer": "paged_adamw_8bit"}, deepspeed={"stage": 2})
    assert not any("bitsandbytes" in p for p in ds.check_deepspeed(on_gpu, "cpu"))
    gradual = {"method": "partial", "train_last_layers": 2, "unfreeze_schedule": {"every_steps": 5, "start_layers": 1}}
    assert any("unfreeze_schedule" in p for p in ds.check_deepspeed(_recipe(tiny_recipe, adapter=gradual, deepspeed={"stage": 2}), "cpu"))
    args = argparse.Namespace(resume=None, force=False, overrides=[], deepspeed=None, verbose=False)
    with pytest.raises(LaunchError, match="unfreeze_schedule"):
        launch(args, _recipe(tiny_recipe, adapter=gradual), "r.yaml", LaunchOptions(nproc=2), console=None)


def test_a_json_without_optimizer_keeps_torch_adamw_under_offload(tiny_recipe, tmp_path):
    """accelerate swapped the Trainer's AdamW for DeepSpeed's CPU Adam (an 85 s JIT build) when a JSON offloaded the
    optimizer and did not say `zero_force_ds_cpu_optimizer: false`, as the generated config does."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    config = ds.build_config(_recipe(tiny_recipe, deepspeed=str(path)), "cpu", torch.float32)
    assert config["zero_force_ds_cpu_optimizer"] is False and config["zero_allow_untested_optimizer"] is True
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "zero_force_ds_cpu_optimizer": True}))  # theirs wins
    assert ds.build_config(_recipe(tiny_recipe, deepspeed=str(path)), "cpu", torch.float32)["zero_force_ds_cpu_optimizer"]
