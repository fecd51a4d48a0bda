"""Recipe problems with the adapter block are single, clear messages, found before any weights load."""

from __future__ import annotations

import copy
import logging
import re

import pytest

from peftkit.adapters import METHODS
from peftkit.config import recipe_from_dict
from peftkit.config.validate import validate_recipe
from peftkit.errors import ConfigError


def _recipe(tiny_recipe, adapter, **top):
    data = copy.deepcopy(tiny_recipe)
    data["adapter"] = adapter
    data.update(top)
    return data


def _problems(tiny_recipe, adapter, **top) -> str:
    with pytest.raises(ConfigError) as info:
        validate_recipe(recipe_from_dict(_recipe(tiny_recipe, adapter, **top)), check_model=True)
    return str(info.value)


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    """Validation must never load weights: make any attempt fail loudly."""
    from transformers import PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("validation loaded model weights")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


def test_every_method_is_registered():
    assert METHODS == ("lora", "qlora", "prefix_tuning", "prompt_tuning", "ia3", "full", "partial")


def test_unknown_method_lists_the_valid_ones(tiny_recipe):
    with pytest.raises(ConfigError) as info:
        recipe_from_dict(_recipe(tiny_recipe, {"method": "adapterfusion"}))
    assert str(info.value).count("\n") == 0
    assert "'adapterfusion' is not an adapter method; choose one of: lora, qlora, prefix_tuning, prompt_tuning, ia3, full, partial" in str(info.value)


def test_parameter_of_another_method(tiny_recipe):
    with pytest.raises(ConfigError, match=r"`num_virtual_tokens` is not a parameter of adapter method `lora` \(its parameters: method, r,"):
        recipe_from_dict(_recipe(tiny_recipe, {"method": "lora", "num_virtual_tokens": 8}))
    with pytest.raises(ConfigError, match="not a parameter of adapter method `full`"):
        recipe_from_dict(_recipe(tiny_recipe, {"method": "full", "r": 8}))
    with pytest.raises(ConfigError, match="unknown key `adapter.unfreeze_schedule.every_step`: did you mean `every_steps`"):
        recipe_from_dict(_recipe(tiny_recipe, {"method": "partial", "unfreeze_schedule": {"every_step": 5}}))


@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        ({"method": "partial", "unfreeze_schedule": {"every_steps": 5, "every_epochs": 1}}, "exactly one of every_steps or every_epochs"),
        ({"method": "partial", "train_last_layers": 0, "train_head": False}, "nothing would train at the start"),
        ({"method": "partial", "train_last_layers": 1, "unfreeze_schedule": {"every_steps": 5, "start_layers": 2}}, "start_layers (2) is more than"),
        ({"method": "partial", "layerwise_lr_decay": 1.5}, "layerwise_lr_decay"),
        ({"method": "prompt_tuning", "init": "text"}, "init: text needs a non-empty init_text"),
        ({"method": "prefix_tuning", "prefix_projection": False, "encoder_hidden_size": 64}, "only applies with prefix_projection: true"),
    ],
)
def test_schema_rules(tiny_recipe, adapter, message):
    with pytest.raises(ConfigError) as info:
        recipe_from_dict(_recipe(tiny_recipe, adapter))
    assert message in str(info.value)


def test_targets_matching_nothing_list_the_linear_modules(tiny_recipe):
    text = _problems(tiny_recipe, {"method": "lora", "target_modules": ["query", "value"]})
    assert "adapter.target_modules ['query', 'value'] matches no linear module in this model" in text
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in text
    assert "matches no linear module" in _problems(tiny_recipe, {"method": "ia3", "target_modules": ["nothing"]})
    assert "write a list, e.g. [q_proj]" in _problems(tiny_recipe, {"method": "lora", "target_modules": "q_proj"})
    regex = _problems(tiny_recipe, {"method": "lora", "target_modules": r".*\.attention\.qkv.*"})
    assert "write a list, e.g. [down_proj, gate_proj]" in regex, "module names, not the regex in brackets"


def test_a_bare_module_name_string_is_explained_as_a_full_name_regex(tiny_recipe):
    """`target_modules: q_proj` is a regex on the full name (peft), so it matches nothing: say so, not only
    list `q_proj` among the modules it supposedly does not match."""
    text = _problems(tiny_recipe, {"method": "lora", "r": 4, "target_modules": "q_proj"})
    assert "regular expression matched against the full module name" in text
    assert "write a list, e.g. [q_proj]" in text


def test_a_listed_target_that_names_nothing_is_an_error_even_when_others_match(tiny_recipe):
    """peft would adapt q_proj alone and say nothing (e.g. k/v names on a model with a fused qkv_proj)."""
    text = _problems(tiny_recipe, {"method": "lora", "target_modules": ["q_proj", "qkv_proj"]})
    assert "adapter.target_modules: 'qkv_proj' names no module of this model" in text and "v_proj" in text
    assert "'qkv_proj' names no module" in _problems(tiny_recipe, {"method": "ia3", "target_modules": ["down_proj", "qkv_proj"],
                                                                   "feedforward_modules": ["down_proj"]})
    # a non-linear module (LoRA on the embeddings) is peft's to accept or refuse
    validate_recipe(recipe_from_dict(_recipe(tiny_recipe, {"method": "lora", "target_modules": ["q_proj", "embed_tokens"]})),
                    check_model=True)


def test_ranges_are_checked_against_the_model(tiny_recipe):
    assert "adapter.layers [0, 2] is out of range: this model has layers 0..1" in _problems(
        tiny_recipe, {"method": "lora", "layers": [0, 2]}
    )
    assert "adapter.train_last_layers 3 is out of range: this model has 2 blocks" in _problems(
        tiny_recipe, {"method": "partial", "train_last_layers": 3}
    )


def test_incompatible_combinations(tiny_recipe):
    assert "quantization: a 4/8-bit base is only supported with lora/qlora, not `full`" in _problems(
        tiny_recipe, {"method": "full"}, quantization={"bits": 4}
    )
    assert "not `partial`" in _problems(tiny_recipe, {"method": "partial"}, quantization={"bits": 8})
    for method in ("prefix_tuning", "prompt_tuning"):
        text = _problems(tiny_recipe, {"method": method}, task="sequence_classification")
        assert f"{method} does not support task: sequence_classification" in text
    assert "loftq corrects the quantization error" in _problems(tiny_recipe, {"method": "lora", "init": "loftq"})
    assert "pissa is not supported over a quantized base" in _problems(tiny_recipe, {"method": "qlora", "init": "pissa"})
    assert "loftq does not combine with use_dora" in _problems(tiny_recipe, {"method": "qlora", "init": "loftq", "use_dora": True})
    text = _problems(tiny_recipe, {"method": "ia3", "target_modules": ["k_proj", "v_proj"], "feedforward_modules": ["down_proj"]})
    assert "feedforward_modules ['down_proj'] must be among the target_modules" in text


def test_loftq_with_dora_is_refused_without_reading_the_model(tiny_recipe):
    """`validate --no-model` accepted the pair, which only the model-reading checks refused."""
    recipe = recipe_from_dict(_recipe(tiny_recipe, {"method": "qlora", "init": "loftq", "use_dora": True}))
    with pytest.raises(ConfigError, match="loftq does not combine with use_dora"):
        validate_recipe(recipe, check_model=False)


def test_checks_are_task_aware(tiny_recipe, tmp_path):
    """`score` exists only on the classification model: the skeleton is built for the recipe's task."""
    labeled = tmp_path / "labeled.jsonl"
    labeled.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n' * 4)
    data = {**tiny_recipe["data"], "train": str(labeled), "heldout": None}
    adapter = {"method": "lora", "target_modules": ["q_proj"], "modules_to_save": ["score"]}
    validate_recipe(recipe_from_dict(_recipe(tiny_recipe, adapter, task="sequence_classification", data=data)))
    assert "modules_to_save: score not found" in _problems(tiny_recipe, adapter)


def test_classification_builtin_needs_its_task(tiny_recipe):
    text = _problems(tiny_recipe, {"method": "lora", "target_modules": ["query"]}, model={"name": "minilm-l6"})
    assert "minilm-l6 is a sequence_classification model; set `task: sequence_classification`" in text


def test_valid_recipes_for_every_method_pass(tiny_recipe):
    for method in METHODS:
        validate_recipe(recipe_from_dict(_recipe(tiny_recipe, {"method": method})), check_model=True)


def test_modules_to_save_is_matched_as_peft_matches_it(tiny_recipe, tiny_model_dir):
    """peft takes every module whose name ends with an entry (no dot boundary), and never puts LoRA inside one."""
    from peftkit.adapters.modules import peft_targets, saved_module
    from peftkit.config.schema import ModelConfig
    from peftkit.models.resolve import resolve_model_ref
    from peftkit.models.skeleton import model_skeleton

    assert saved_module("lm_head", ["head"]) and saved_module("model.embed_tokens", ["embed_tokens"])
    assert saved_module("model.layers.0.mlp.down_proj", ["layers.0.mlp"]), "inside a saved module"
    assert not saved_module("model.layers.1.mlp.down_proj", ["layers.0.mlp"])
    validate_recipe(recipe_from_dict(_recipe(tiny_recipe, {"method": "lora", "modules_to_save": ["head"]})))
    skeleton = model_skeleton(resolve_model_ref(str(tiny_model_dir)), ModelConfig(name=str(tiny_model_dir)))
    targets = peft_targets(skeleton, ["down_proj", "q_proj"], ["layers.0.mlp"])
    assert "model.layers.0.mlp.down_proj" not in targets and "model.layers.1.mlp.down_proj" in targets
    assert "model.layers.0.self_attn.q_proj" in targets


def test_dora_over_an_int8_base_is_refused_on_the_cpu_only(tiny_recipe):
    from peftkit.adapters import DORA_INT8_ON_CPU, check_recipe_adapter

    dora8 = {"method": "qlora", "use_dora": True}
    cpu = {**tiny_recipe["train"], "device": "cpu"}
    assert DORA_INT8_ON_CPU in _problems(tiny_recipe, dora8, quantization={"bits": 8}, train=cpu)
    assert DORA_INT8_ON_CPU in _problems(tiny_recipe, {"method": "lora", "use_dora": True}, quantization={"bits": 8},
                                         train=cpu)
    validate_recipe(recipe_from_dict(_recipe(tiny_recipe, dora8, quantization={"bits": 4}, train=cpu)), check_model=True)
    on_gpu = recipe_from_dict(_recipe(tiny_recipe, dora8, quantization={"bits": 8},
                                      train={**tiny_recipe["train"], "device": "cuda"}))
    assert DORA_INT8_ON_CPU not in check_recipe_adapter(on_gpu)


def test_why_dora_over_int8_is_refused_on_the_cpu(tiny_model_dir, monkeypatch):
    """The upstream failure behind DORA_INT8_ON_CPU: when this stops failing (a peft / bitsandbytes upgrade), lift
    the refusal."""
    monkeypatch.undo()  # this test loads weights on purpose
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32,
                                                 quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                 device_map={"": "cpu"})  # the CPU's failure, also on a GPU host
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids, labels=ids).loss.backward()  # the first step runs
    with pytest.raises(AttributeError, match="NoneType"):
        model(input_ids=ids, labels=ids).loss.backward()


def test_a_gpu_trained_int8_dora_run_is_refused_on_the_cpu_before_loading(tiny_recipe, tmp_path):
    """Such a run (trained on a GPU) would fail at its second forward pass here: one message before any weights."""
    import json

    import torch
    import yaml
    from safetensors.torch import save_file

    from peftkit.errors import RunDirError
    from peftkit.runs import load_run

    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    recipe = _recipe(tiny_recipe, {"method": "qlora", "use_dora": True}, quantization={"bits": 8},
                     train={**tiny_recipe["train"], "device": "cuda"}, output_dir=str(run_dir))
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (run_dir / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True, "r": 4}))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"  # shaped for the tiny model: it passes the fit check
    save_file({f"{prefix}.lora_A.weight": torch.zeros(4, 32), f"{prefix}.lora_B.weight": torch.zeros(32, 4)},
              str(run_dir / "adapter" / "adapter_model.safetensors"))
    with pytest.raises(RunDirError, match="trained DoRA over an 8-bit base, which peft cannot run on the CPU"):
        load_run(run_dir, device="cpu")
    with pytest.raises(AssertionError, match="validation loaded model weights"):  # past the check: the base loads
        load_run(run_dir, device="cpu", quantized_base=False)


def test_a_revision_of_a_local_model_is_warned(tiny_recipe, caplog):
    """`model.revision` picks a Hub version; on a local folder it was ignored without a word."""
    recipe = {**tiny_recipe, "model": {**tiny_recipe["model"], "revision": "v9"}}
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        validate_recipe(recipe_from_dict(recipe), check_model=True)
    assert re.search(r"model\.revision: v9 picks a version of a Hub model, but .* is a local model folder, which has "
                     r"none: it is ignored", caplog.text)
