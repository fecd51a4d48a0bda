"""Problems `peftkit validate` used to let through (or crash on): each is now one clear ConfigError problem
(or, for a trailing user turn, one warning), found before any weights load."""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from peftkit.cli import main
from peftkit.config import load_recipe, recipe_from_dict
from peftkit.config.validate import validate_recipe
from peftkit.errors import ConfigError


def _with(tiny_recipe: dict[str, Any], section: str, **values: Any) -> dict[str, Any]:
    data = copy.deepcopy(tiny_recipe)
    data[section] = {**data.get(section, {}), **values}
    return data


def _problems(data: dict[str, Any], check_model: bool = True) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_recipe(recipe_from_dict(data), check_model=check_model)
    return info.value.problems


def _write(tmp_path: Path, data: dict[str, Any] | str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


# 1. an invalid regex in target_modules

@pytest.mark.parametrize("method", ["lora", "qlora", "ia3"])
def test_invalid_target_regex_is_one_problem_naming_key_error_and_example(tiny_recipe, method):
    data = {**tiny_recipe, "adapter": {"method": method, "target_modules": "q_proj[("}}
    with pytest.raises(ConfigError) as info:
        recipe_from_dict(data)
    [problem] = info.value.problems
    assert problem.startswith("`adapter.target_modules`: is not a valid regular expression (unterminated character set")
    assert "[q_proj, v_proj]" in problem and "all-linear" in problem


@pytest.mark.parametrize(("written", "said"), [("q_proj,v_proj", "several module names are a list: [q_proj, v_proj]"),
                                               ("q_proj, k_proj,", "a list: [q_proj, k_proj]"),
                                               ("all", "`all` (LLaMA-Factory's) is written `all-linear` here")])
def test_llama_factory_target_strings_are_named_before_the_model_loads(tiny_recipe, written, said):
    """`lora_target: q_proj,v_proj` carried over was a regex matching nothing, found only once the model was read
    (`validate --no-model` said OK); a regex with a counted repeat keeps its comma."""
    with pytest.raises(ConfigError, match=re.escape(said)):
        recipe_from_dict({**tiny_recipe, "adapter": {"method": "lora", "target_modules": written}})
    assert recipe_from_dict({**tiny_recipe, "adapter": {"method": "lora", "target_modules": r"model\.layers\.\d{1,2}\.self_attn\.q_proj"}})


def test_unclosed_list_override_is_reported_not_raised(tiny_recipe, tmp_path, capsys):
    """`--set adapter.target_modules=[q_proj` is not YAML, so it arrives as the string `[q_proj`."""
    code = main(["validate", str(_write(tmp_path, tiny_recipe)), "--set", "adapter.target_modules=[q_proj"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "`adapter.target_modules`: is not a valid regular expression" in err and "closing `]`" in err


# 2. a target pattern that selects modules LoRA cannot wrap

@pytest.mark.parametrize(("target", "named"), [(".*", "model.layers.0.self_attn (LlamaAttention)"),
                                               (".*mlp.*", "model.layers.0.mlp (LlamaMLP)")])
def test_pattern_matching_modules_lora_cannot_adapt_is_refused(tiny_recipe, target, named):
    [problem] = _problems(_with(tiny_recipe, "adapter", target_modules=target))
    assert f"adapter.target_modules {target!r} matches modules LoRA cannot adapt" in problem
    assert named in problem and "Linear, Embedding" in problem and "all-linear" in problem


def test_the_refused_pattern_is_one_peft_refuses_and_narrow_patterns_pass(tiny_recipe, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="is not supported"):  # what `train` would hit after weights load
        get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), LoraConfig(r=4, target_modules=".*mlp.*"))
    for target in [r".*\.(q_proj|v_proj)", ["q_proj", "embed_tokens"]]:
        validate_recipe(recipe_from_dict(_with(tiny_recipe, "adapter", target_modules=target)))
    # with `layers`, a regex is resolved to the linear layers in range, so containers never reach peft
    validate_recipe(recipe_from_dict(_with(tiny_recipe, "adapter", target_modules=".*mlp.*", layers=[0, 0])))


# 3. non-finite numbers

@pytest.mark.parametrize(("section", "key", "value"), [
    ("train", "lr", float("inf")), ("train", "epochs", float("inf")), ("train", "max_grad_norm", float("nan")),
    ("adapter", "alpha", float("inf")), ("data", "eval_fraction", float("nan")),
])
def test_non_finite_numbers_are_refused(tiny_recipe, section, key, value):
    with pytest.raises(ConfigError) as info:
        recipe_from_dict(_with(tiny_recipe, section, **{key: value}))
    assert info.value.problems == [f"`{section}.{key}` must be a finite number, not {value!r} (YAML reads `.inf` / "
                                   "`.nan` as infinity / not a number); give a real value, or remove the key for the default"]


def test_yaml_inf_in_a_nested_section_is_refused(tiny_recipe, tmp_path):
    data = _with(tiny_recipe, "data", replay={"path": "builtin:general", "ratio": 0.5})
    text = yaml.safe_dump(data).replace("ratio: 0.5", "ratio: .nan")
    with pytest.raises(ConfigError, match=r"`data.replay.ratio` must be a finite number"):
        load_recipe(_write(tmp_path, text))


# 4. LoRA rank against the targeted layers

def test_rank_above_smallest_targeted_layer_names_the_layer(tiny_recipe):
    """The tiny Llama's k_proj is 32 -> 16 (2 kv heads of 8): r 16 is the most that means anything."""
    [problem] = _problems(_with(tiny_recipe, "adapter", r=17))
    assert problem.startswith("adapter.r = 17 is larger than the smallest targeted layer "
                              "(model.layers.0.self_attn.k_proj: 16 wide; layers narrower than r: k_proj, v_proj)")
    assert "target the others by name: ['down_proj', 'gate_proj', 'o_proj', 'q_proj', 'up_proj'], or lower r to 16" in problem
    validate_recipe(recipe_from_dict(_with(tiny_recipe, "adapter", r=16)))
    validate_recipe(recipe_from_dict(_with(tiny_recipe, "adapter", r=32, target_modules=["gate_proj", "up_proj"])))


def test_a_lora_on_a_tied_output_head_is_refused_with_modules_to_save_as_the_way(tiny_recipe, tmp_path):
    """Merging it would change the shared input embeddings too: the merged model would not be the trained one."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = AutoConfig.for_model("qwen2", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "qwen2")
    tokenizer.save_pretrained(tmp_path / "qwen2")
    recipe = _with(_with(tiny_recipe, "model", name=str(tmp_path / "qwen2")), "adapter", target_modules=["q_proj", "lm_head"])
    [problem] = _problems(recipe)
    assert "includes the output head lm_head, whose weight is tied" in problem and "modules_to_save: [lm_head]" in problem
    validate_recipe(recipe_from_dict(_with(recipe, "adapter", target_modules=["q_proj"], modules_to_save=["lm_head"])))
    config.tie_word_embeddings = False  # a head of its own: its LoRA merges into it alone
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "untied")
    tokenizer.save_pretrained(tmp_path / "untied")
    validate_recipe(recipe_from_dict(_with(recipe, "model", name=str(tmp_path / "untied"))))


def test_absurd_rank_is_refused_without_the_model(tiny_recipe):
    with pytest.raises(ConfigError, match=r"`adapter.r`: Input should be less than or equal to 65536"):
        recipe_from_dict(_with(tiny_recipe, "adapter", r=100_000_000_000))


# 5. duplicate keys

def test_duplicate_key_is_refused_with_file_line_and_key(tmp_path, chat_file):
    path = _write(tmp_path, f"data: {{train: {chat_file}}}\nadapter:\n  r: 4\n  alpha: 8\n  alpha: 16\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert info.value.problems == [f"{path}:5: duplicate key `alpha` (first given at line 4); YAML would keep only the "
                                   "last value: remove one of them"]


def test_keys_merged_from_an_anchor_may_be_overridden(tmp_path, chat_file):
    text = f"data: {{train: {chat_file}}}\nadapter:\n  <<: {{r: 4, alpha: 8}}\n  alpha: 16\n"
    assert load_recipe(_write(tmp_path, text)).adapter.alpha == 16


# 6. environment variables in paths

def test_environment_variables_in_data_paths_are_expanded(tmp_path, chat_file, monkeypatch):
    monkeypatch.setenv("PEFTKIT_TEST_DATA", str(chat_file.parent))
    for spelled in ("$PEFTKIT_TEST_DATA", "${PEFTKIT_TEST_DATA}"):
        recipe = load_recipe(_write(tmp_path, {"data": {"train": f"{spelled}/{chat_file.name}"}}))
        assert recipe.data.train == str(chat_file)


def test_unset_variable_is_named_in_the_missing_file_message(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.delenv("PEFTKIT_UNSET_VAR", raising=False)
    data = _with(tiny_recipe, "data", train="${PEFTKIT_UNSET_VAR}/train.jsonl")
    with pytest.raises(ConfigError) as info:
        validate_recipe(load_recipe(_write(tmp_path, data)), check_model=False)
    [problem] = info.value.problems
    assert "does not exist" in problem and "$PEFTKIT_UNSET_VAR is not set in the environment" in problem


# 7. lone surrogates in JSON data

def test_lone_surrogate_is_a_located_data_problem(tiny_recipe, tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    bad = '{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "ok"}]}'
    data_file = tmp_path / "bad.jsonl"
    data_file.write_text(f"{good}\n{bad}\n", encoding="utf-8")
    [problem] = _problems(_with(tiny_recipe, "data", train=str(data_file)))
    assert problem.startswith(f"data.train: {data_file}:2: invalid unicode (lone surrogate U+D800")


def test_lone_surrogate_through_the_cli_has_no_traceback(tiny_recipe, tmp_path, capsys):
    data_file = tmp_path / "bad.jsonl"
    data_file.write_text('{"messages": [{"role": "user", "content": "\\udfff x"}, '
                         '{"role": "assistant", "content": "ok"}]}\n', encoding="utf-8")
    code = main(["validate", str(_write(tmp_path, _with(tiny_recipe, "data", train=str(data_file))))])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "invalid unicode (lone surrogate U+DFFF" in err, err


# 8. conversations ending with a user turn

def test_trailing_user_turn_warns_once_with_the_count(tiny_recipe, tmp_path, caplog):
    rows = [[("user", "hi"), ("assistant", "hello"), ("user", "and then?")],
            [("user", "a"), ("assistant", "b")],
            [("user", "c"), ("assistant", "d"), ("user", "e")]]
    data_file = tmp_path / "trailing.jsonl"
    data_file.write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in row]}) + "\n"
                                 for row in rows), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        validate_recipe(recipe_from_dict(_with(tiny_recipe, "data", train=str(data_file))), check_model=False)
    warnings = [r.getMessage() for r in caplog.records if "trailing turn" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"2 conversation(s) end with a user or tool turn after the "
                                                         f"last assistant reply (first: {data_file}:1)")
    caplog.clear()  # with train_on_prompt the trailing turn is trained: no warning that says it is not
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        validate_recipe(recipe_from_dict(_with(tiny_recipe, "data", train=str(data_file), train_on_prompt=True)),
                        check_model=False)
    assert not [r for r in caplog.records if "trailing turn" in r.getMessage()]


def test_conversation_without_assistant_turn_is_still_an_error(tiny_recipe, tmp_path):
    data_file = tmp_path / "user_only.jsonl"
    data_file.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", encoding="utf-8")
    [problem] = _problems(_with(tiny_recipe, "data", train=str(data_file)), check_model=False)
    assert "no assistant turn to train on" in problem


# data.max_seq_len past the model's positions

def test_max_seq_len_past_learned_positions_is_a_problem_and_past_a_rope_context_a_warning(tiny_recipe, tmp_path, caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.conftest import build_tiny_tokenizer

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=16, n_layer=1, n_head=2, vocab_size=400)).save_pretrained(gpt2)
    build_tiny_tokenizer().save_pretrained(gpt2)
    recipe = _with(_with(tiny_recipe, "model", name=str(gpt2)), "data", max_seq_len=128)
    recipe["adapter"] = {**recipe["adapter"], "target_modules": "all-linear"}
    problems = _problems(recipe)
    assert any("data.max_seq_len: 128 tokens do not fit" in p and "learned positions for 64" in p
               and "set data.max_seq_len to 64 or less" in p for p in problems), problems
    recipe["data"]["max_seq_len"] = 64
    validate_recipe(recipe_from_dict(recipe))
    llama_context = json.loads((Path(tiny_recipe["model"]["name"]) / "config.json").read_text())["max_position_embeddings"]
    with caplog.at_level(logging.WARNING):
        validate_recipe(recipe_from_dict(_with(tiny_recipe, "data", max_seq_len=llama_context + 1)))
    assert f"longer than the {llama_context}-token context" in caplog.text


def test_settings_another_setting_overrides_are_warned_about(tiny_recipe, tmp_path, caplog):
    other_eval = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    (tmp_path / "eval.jsonl").write_text(other_eval + "\n")
    recipe = _with(_with(tiny_recipe, "data", eval=str(tmp_path / "eval.jsonl"), eval_fraction=0.3),
                   "train", max_steps=3, epochs=2)
    with caplog.at_level(logging.WARNING):
        validate_recipe(recipe_from_dict(recipe), check_model=False)
    assert "data.eval_fraction is ignored" in caplog.text and "train.epochs is ignored" in caplog.text
    caplog.clear()
    plain = copy.deepcopy(tiny_recipe)
    plain["train"].pop("epochs", None)
    with caplog.at_level(logging.WARNING):
        validate_recipe(recipe_from_dict(plain), check_model=False)
    assert "is ignored" not in caplog.text
    from peftkit.config.load import recipe_to_yaml

    stored = recipe_from_dict(_with(plain, "train", max_steps=3))  # a run's recipe.yaml writes every default out
    with caplog.at_level(logging.WARNING):
        validate_recipe(recipe_from_dict(yaml.safe_load(recipe_to_yaml(stored))), check_model=False)
    assert "is ignored" not in caplog.text


def test_a_models_own_template_without_an_end_token_is_refused_like_a_template_file(tiny_model_dir, tmp_path):
    """Replies trained with no end token teach the model never to stop; a template file was refused for it, the
    model's own template went through."""
    import shutil

    from peftkit.config.schema import ModelConfig
    from peftkit.errors import PeftkitError
    from peftkit.models import load_tokenizer

    model_dir = tmp_path / "completion-style"
    shutil.copytree(tiny_model_dir, model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}Assistant:{% endif %}")
    config_path.write_text(json.dumps(config))
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(PeftkitError, match=r"the model's own chat template: .*with no end token at all.*chat_template"):
        load_tokenizer(ModelConfig(name=str(model_dir)))
    load_tokenizer(ModelConfig(name=str(model_dir), chat_template="plain"))  # the way out works


def test_the_default_max_seq_len_is_lowered_to_learned_positions_and_roberta_counts_from_its_padding(tiny_recipe, tmp_path):
    """A recipe that leaves data.max_seq_len out (schema default 1024) on a 512-position BERT must still run; an
    explicit value past the table is the user's to fix. RoBERTa's positions start after its padding index."""
    from transformers import RobertaConfig, RobertaForCausalLM

    from peftkit.models.skeleton import learned_position_limit
    from tests.conftest import build_tiny_tokenizer

    roberta = RobertaForCausalLM(RobertaConfig(vocab_size=400, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=32, max_position_embeddings=66, pad_token_id=1,
                                               is_decoder=True))
    assert learned_position_limit(roberta) == 64  # 66 rows, positions from padding_idx + 1 = 2
    roberta.save_pretrained(tmp_path / "roberta")
    build_tiny_tokenizer().save_pretrained(tmp_path / "roberta")
    recipe = _with(tiny_recipe, "model", name=str(tmp_path / "roberta"))
    recipe["adapter"] = {**recipe["adapter"], "target_modules": ["query", "value"]}
    recipe["data"] = {k: v for k, v in recipe["data"].items() if k != "max_seq_len"}
    assert validate_recipe(recipe_from_dict(recipe)).data.max_seq_len == 64
    problems = _problems(_with(recipe, "data", max_seq_len=65))
    assert any("set data.max_seq_len to 64 or less" in p for p in problems), problems


def test_settings_that_need_bitsandbytes_are_recipe_problems_without_it(tiny_recipe, monkeypatch):
    """A quantized base or an 8-bit / paged optimizer without bitsandbytes: transformers would import it only after the
    model loaded, with a bare ImportError."""
    import sys

    from peftkit.config.validate import bitsandbytes_problems

    qlora = copy.deepcopy(tiny_recipe)
    qlora["adapter"] = {"method": "qlora"}
    assert bitsandbytes_problems(recipe_from_dict(qlora)) == []  # installed here
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    for name in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit"):
        recipe = recipe_from_dict(_with(tiny_recipe, "train", optimizer=name))
        assert bitsandbytes_problems(recipe) == [f"train.optimizer {name} needs bitsandbytes: `pip install "
                                                 "bitsandbytes` (or train.optimizer: auto)"]
    assert bitsandbytes_problems(recipe_from_dict(_with(tiny_recipe, "train", optimizer="adamw_torch"))) == []
    assert bitsandbytes_problems(recipe_from_dict(qlora)) == [
        "quantization needs bitsandbytes: `pip install bitsandbytes` (or remove `quantization:`)"]
    with pytest.raises(ConfigError, match="train.optimizer paged_adamw_8bit needs bitsandbytes"):
        validate_recipe(recipe_from_dict(_with(tiny_recipe, "train", optimizer="paged_adamw_8bit")), check_model=False)


def test_an_empty_user_turn_is_warned_about(tmp_path, tiny_recipe, caplog):
    from tests.conftest import write_jsonl

    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "", "completion": "orphan"}, {"prompt": "hi", "completion": "yo"},
                                              {"messages": [{"role": "user", "content": "   "},
                                                            {"role": "assistant", "content": "ok"}]}])
    recipe = recipe_from_dict({**tiny_recipe, "data": {**tiny_recipe["data"], "train": str(path)}})
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        validate_recipe(recipe, check_model=False)
    assert f"data.train: 2 conversation(s) have an empty user turn (first: {path}:1)" in caplog.text
