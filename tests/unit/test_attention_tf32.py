"""`model.attn_implementation` and `train.tf32`: passed through where they apply, refused early where they cannot."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from peftkit.config.load import recipe_from_dict
from peftkit.config.schema import ModelConfig
from peftkit.config.validate import validate_recipe
from peftkit.errors import ConfigError, MissingDependencyError
from peftkit.models.load import attention_kwargs, attention_problem, load_model
from peftkit.train.run import check_device_options, training_arguments


def without_flash_attn(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("flash_attn") else real(name, *a))


def test_auto_passes_nothing_and_named_kernels_pass_through(tiny_model_dir):
    assert attention_kwargs(ModelConfig(name=str(tiny_model_dir)), "cpu") == {}
    eager = ModelConfig(name=str(tiny_model_dir), attn_implementation="eager")
    assert attention_kwargs(eager, "cpu") == {"attn_implementation": "eager"}
    model = load_model(eager)
    assert model.config._attn_implementation == "eager"
    assert load_model(ModelConfig(name=str(tiny_model_dir))).config._attn_implementation == "sdpa"


@pytest.mark.parametrize("kernel", ["flash_attention_2", "flex_attention"])  # flex: no backward pass on a CPU
def test_gpu_only_attention_off_a_gpu_falls_back_with_a_warning(tiny_model_dir, caplog, kernel):
    cfg = ModelConfig(name=str(tiny_model_dir), attn_implementation=kernel)
    with caplog.at_level(logging.WARNING, logger="peftkit.models.load"):
        assert attention_kwargs(cfg, "cpu") == {}
    assert "needs a CUDA GPU (off one it" in caplog.text and "loading on cpu with transformers' default" in caplog.text
    assert load_model(cfg).config._attn_implementation == "sdpa", "a GPU-trained run still chats on a CPU"


def test_flex_attention_trains_on_a_cpu_with_the_default_kernel(tiny_recipe):
    from peftkit.config import recipe_from_dict
    from peftkit.train.run import train

    recipe = {**tiny_recipe, "model": {**tiny_recipe["model"], "attn_implementation": "flex_attention"}}
    assert train(recipe_from_dict(recipe)).run_dir.joinpath("adapter", "adapter_model.safetensors").is_file()


def test_flash_attention_without_its_package_is_refused_before_loading(monkeypatch, tiny_model_dir):
    without_flash_attn(monkeypatch)
    cfg = ModelConfig(name=str(tiny_model_dir), attn_implementation="flash_attention_2")
    with pytest.raises(MissingDependencyError, match=r"needs the flash-attn package .*pip install flash-attn"):
        attention_kwargs(cfg, "cuda")


def test_validate_names_kernels_the_architecture_lacks(monkeypatch, tiny_recipe):
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2))
    problem = attention_problem("flex_attention", gpt2)
    assert problem and "GPT2LMHeadModel has no flex_attention kernel" in problem and "sdpa" in problem
    assert attention_problem("sdpa", gpt2) is None
    without_flash_attn(monkeypatch)
    tiny_recipe["model"]["attn_implementation"] = "flash_attention_2"
    validate_recipe(recipe_from_dict(tiny_recipe))  # on this CPU it falls back (with a warning) at load time
    tiny_recipe["train"]["device"] = "cuda"  # where the package is needed
    with pytest.raises(ConfigError, match="model.attn_implementation: flash_attention_2 needs the flash-attn package"):
        validate_recipe(recipe_from_dict(tiny_recipe))


def test_tf32_only_on_ampere_or_newer(monkeypatch, caplog, tiny_recipe, tmp_path):
    def options(**train):
        return recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], **train}}).train

    with caplog.at_level(logging.WARNING, logger="peftkit.train.run"):
        check_device_options(options(tf32=True), "cpu")
    assert "training on cpu ignores it" in caplog.text
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    with pytest.raises(ConfigError, match=r"needs an Ampere or newer GPU .*Tesla V100 is 7.0"):
        check_device_options(options(tf32=True), "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    check_device_options(options(tf32=True), "cuda")
    check_device_options(options(tf32=False), "cuda")
    tiny_recipe["train"]["tf32"] = True
    args = training_arguments(recipe_from_dict(tiny_recipe), tmp_path, "cpu", torch.float32, has_eval=False)
    assert args.tf32 is None, "not set on a CPU run (transformers would refuse it)"


def test_paged_optimizer_off_cuda_is_named_before_the_model_loads(caplog, tiny_recipe):
    tiny_recipe["train"]["optimizer"] = "paged_adamw_8bit"
    train = recipe_from_dict(tiny_recipe).train
    with caplog.at_level(logging.WARNING, logger="peftkit.train.run"):
        check_device_options(train, "cuda")
    assert "page" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="peftkit.train.run"):
        check_device_options(train, "cpu")
    assert "nothing to page and it runs as adamw_8bit" in caplog.text


def test_validate_names_a_paged_optimizer_off_cuda_once_and_bitsandbytes_says_nothing_more(caplog, tiny_recipe):
    """validate said nothing of it (training did), and training's own warning was followed by bitsandbytes'
    UserWarning with its source line."""
    import subprocess
    import sys

    from peftkit.config.validate import validate_recipe
    from peftkit.utils.once import command_scope

    tiny_recipe["train"]["optimizer"] = "paged_adamw_32bit"
    recipe = recipe_from_dict(tiny_recipe)
    with command_scope(), caplog.at_level(logging.WARNING):
        validate_recipe(recipe, check_model=False)
        check_device_options(recipe.train, "cpu")  # what training says on the same command: not again
    assert caplog.text.count("nothing to page and it runs as adamw_32bit") == 1
    step = ("import torch, bitsandbytes as bnb\n{}w = torch.nn.Parameter(torch.ones(4, 4)); w.grad = torch.ones(4, 4)\n"
            "bnb.optim.PagedAdamW32bit([w], lr=1e-3).step()")  # the state buffers: where bitsandbytes warns
    said = [subprocess.run([sys.executable, "-c", step.format(imports)], capture_output=True, text=True, check=True).stderr
            for imports in ("", "import peftkit.train.run\n")]  # a training process imports it
    assert "Paged optimizers are not supported on CPU" in said[0] and "Paged optimizers" not in said[1]


def test_tf32_a_run_turned_on_is_turned_off_again_for_the_caller():
    """train.tf32 sets TF32 for the whole process (transformers' enable_tf32): a sweep's or notebook's next run, and
    its own float32 work, ran in TF32 though they never asked."""
    import torch

    from peftkit.train.run import callers_settings_kept, fp32_precisions

    before = {id(backend): precision for backend, precision in fp32_precisions().items()}
    assert torch.backends.cuda.matmul in fp32_precisions()
    with callers_settings_kept():
        torch.backends.fp32_precision = "tf32"  # what enable_tf32(True) does on torch 2.9+
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert {id(backend): precision for backend, precision in fp32_precisions().items()} == before
