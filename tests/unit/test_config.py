"""Recipe parsing: typed sections, overrides, every problem reported at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftkit.config import load_recipe, recipe_from_dict, recipe_to_yaml
from peftkit.config.load import parse_override
from peftkit.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_minimal_recipe_gets_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, "data: {train: train.jsonl}\n"))
    assert recipe.model.name == "smollm2-135m-instruct"
    assert recipe.adapter.method == "lora" and recipe.adapter.target_modules == "all-linear"
    assert recipe.model.trust_remote_code is False and recipe.model.allow_pickle is False
    assert recipe.data.train == str(tmp_path / "train.jsonl"), "data paths resolve against the recipe's folder"


def test_recipe_is_frozen(tmp_path):
    recipe = load_recipe(write(tmp_path, "data: {train: t.jsonl}\n"))
    with pytest.raises(Exception):
        recipe.train.lr = 1.0  # type: ignore[misc]


def test_overrides_parse_yaml_scalars_and_nested_keys(tmp_path):
    recipe = load_recipe(
        write(tmp_path, "data: {train: t.jsonl}\n"),
        ["train.lr=1e-4", "adapter.r=8", "adapter.target_modules=[q_proj, v_proj]", "quantization.bits=8"],
    )
    assert recipe.train.lr == pytest.approx(1e-4)
    assert recipe.adapter.r == 8
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]
    assert recipe.quantization is not None and recipe.quantization.bits == 8


def test_a_null_override_drops_the_key_so_a_method_can_be_switched(tmp_path):
    """`adapter.method=prompt_tuning` on a LoRA recipe: its `r` and `target_modules` are not prompt tuning's keys;
    `adapter.r=null` takes one out, where setting it to null was refused as another method's key."""
    path = write(tmp_path, "adapter: {method: lora, r: 8, target_modules: [q_proj]}\ndata: {train: t.jsonl, eval: e.jsonl}\n")
    (tmp_path / "t.jsonl").write_text("")
    (tmp_path / "e.jsonl").write_text("")
    recipe = load_recipe(path, ["adapter.method=prompt_tuning", "adapter.r=null", "adapter.target_modules=null",
                                "data.eval=null", "model.revision=null"])
    assert recipe.adapter.method == "prompt_tuning" and recipe.data.eval is None
    assert "eval" not in recipe.data.model_fields_set and recipe.model.revision is None
    # a key the recipe does not have is not created as a section, and a misspelt one is still refused
    for override, refusal in (("adapter.rr=null", "did you mean `r`"), ("quantization.bits=null", "quantization.bits"),
                              ("deepspeed.stage=null", "deepspeed")):
        with pytest.raises(ConfigError, match=refusal):
            load_recipe(path, [override])


def test_a_bad_value_given_on_the_command_line_is_said_to_come_from_there(tmp_path):
    """`peftkit train base.yaml train.lr=high` was "Invalid recipe in base.yaml: train.lr ...": the value is not in
    the file the user was sent to."""
    path = write(tmp_path, "data: {train: t.jsonl}\ntrain: {epochs: 0}\n")
    (tmp_path / "t.jsonl").write_text("")
    with pytest.raises(ConfigError) as info:
        load_recipe(path, ["train.lr=high", "adapter.r=8"])
    (lr,) = [p for p in info.value.problems if "train.lr" in p]
    (epochs,) = [p for p in info.value.problems if "train.epochs" in p]
    assert lr.endswith("(got 'high') (set on the command line: `train.lr=high`)")
    assert "command line" not in epochs  # the file's own mistake
    with pytest.raises(ConfigError) as info:  # a misspelt section: the key named is `trian`, the override `trian.lr`
        load_recipe(path, ["trian.lr=5e-4"])
    (typo,) = [p for p in info.value.problems if "trian" in p]
    assert typo.endswith("did you mean `train`? (set on the command line: `trian.lr=5e-4`)")


def test_a_data_file_given_as_the_recipe_is_named_as_data_and_a_json_recipe_still_reads(tmp_path):
    """`peftkit train data/train.jsonl` was a YAML syntax error at line 2 with no word of what the file is."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": []}\n')
    with pytest.raises(ConfigError, match=r"train\.jsonl is a data file \(\.jsonl\), not a recipe: .*data: \{train: "):
        load_recipe(data)
    one = tmp_path / "one.json"
    one.write_text('{"instruction": "x", "output": "y"}')  # parses, as a mapping of no recipe section
    with pytest.raises(ConfigError, match="is a data file"):
        load_recipe(one)
    recipe = tmp_path / "recipe.json"  # YAML reads JSON: a recipe written so is a recipe
    recipe.write_text(json.dumps({"data": {"train": str(data)}}))
    assert load_recipe(recipe).data.train == str(data)
    # another tool's JSON config (no peftkit section, no record format) gets the key hints, a broken one its error
    recipe.write_text(json.dumps({"base_model": "x", "datasets": [{"path": str(data)}], "lora_r": 8}))
    with pytest.raises(ConfigError, match="did you mean `model.name`") as info:
        load_recipe(recipe)
    assert "not a recipe" not in str(info.value)
    recipe.write_text('{"data": {"train": "t.jsonl"')
    with pytest.raises(ConfigError, match="YAML syntax error"):
        load_recipe(recipe)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match=r"'output_dir=' has no value \(an unset shell variable\?\); write "
                                          r"output_dir=null for the default, or \"output_dir=''\" \(quoted"):
        parse_override("output_dir=")
    assert parse_override("data.system_prompt=''")[1] == ""


@pytest.mark.parametrize("section", [{"adapter": {"method": "lora", "r": True}}, {"train": {"epochs": "yes"}},
                                     {"train": {"eval_steps": "on"}}])
def test_true_or_false_is_refused_for_a_number(tmp_path, section):
    (name, values), = section.items()
    (key, value), = ((k, v) for k, v in values.items() if k != "method")
    text = f"data: {{train: t.jsonl}}\n{name}: {{{', '.join(f'{k}: {v}' for k, v in values.items())}}}\n"
    with pytest.raises(ConfigError, match=rf"`{name}.{key}` must be a number, not true"):
        load_recipe(write(tmp_path, text))
    with pytest.raises(ConfigError) as info:  # the section's other problems are said too
        load_recipe(write(tmp_path, text), [f"{name}.foo=1"])
    assert "foo" in str(info.value) and "must be a number" in str(info.value)
    assert load_recipe(write(tmp_path, "data: {train: t.jsonl}\ntrain: {gradient_checkpointing: yes}\n"))


def test_all_problems_reported_at_once_with_did_you_mean(tmp_path):
    text = "model: {nme: x}\nadapter: {method: lora, rr: 8}\ndata: {train: t.jsonl}\ntrain: {lr: -1, epocs: 2}\n"
    with pytest.raises(ConfigError) as info:
        load_recipe(write(tmp_path, text))
    message = str(info.value)
    assert len(info.value.problems) == 5  # t.jsonl does not exist either
    assert "`data.train`: file" in message and "t.jsonl does not exist" in message
    assert "did you mean `name`" in message
    assert "did you mean `r`" in message
    assert "did you mean `epochs`" in message
    assert "train.lr" in message and "greater than 0" in message


def test_other_tools_key_names_point_at_peftkits(tmp_path):
    """axolotl / LLaMA-Factory / TRL spellings a new user brings along."""
    text = ("model: {name: x, flash_attention: true}\ndata: {train: t.jsonl, cutoff_len: 512, val_set_size: 0.05}\n"
            "train: {optim: adamw_torch, bf16: true}\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(write(tmp_path, text))
    message = str(info.value)
    for wrong, right in [("model.flash_attention", "attn_implementation"), ("data.cutoff_len", "max_seq_len"),
                         ("data.val_set_size", "eval_fraction"), ("train.optim", "optimizer"), ("train.bf16", "dtype")]:
        assert f"unknown key `{wrong}`: did you mean `{right}`?" in message


def test_unknown_adapter_method_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="choose one of: lora"):
        load_recipe(write(tmp_path, "adapter: {method: lorax}\ndata: {train: t.jsonl}\n"))


def test_parameter_of_another_method_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not a parameter of adapter method `lora`"):
        load_recipe(write(tmp_path, "adapter: {method: lora, num_virtual_tokens: 4}\ndata: {train: t.jsonl}\n"))


def test_yaml_syntax_error_has_line(tmp_path):
    with pytest.raises(ConfigError, match="line 2"):
        load_recipe(write(tmp_path, "data:\n  train: x: y: z\nmodel: {}\n"))


@pytest.mark.parametrize("text, said", [
    ("data:\n  train: a.jsonl\n  system_prompt: Note: be brief.\n",
     r"line 3, column 22 \(`system_prompt: Note: be brief.`\): mapping values are not allowed here; a value that "
     r"holds ': ' must be quoted"),
    ("data:\n    train: a.jsonl\n  eval: b.jsonl\n",
     r"line 3, column 3 \(`eval: b.jsonl`\): expected <block end>.*; indent this line as the other keys of its section"),
    ("data:\n\ttrain: a.jsonl\n", r"line 2, column 1 .*; YAML indents with spaces only: replace the tab")])
def test_yaml_mistakes_people_make_are_explained(tmp_path, text, said):
    with pytest.raises(ConfigError, match=said):
        load_recipe(write(tmp_path, text))


def test_missing_required_section(tmp_path):
    with pytest.raises(ConfigError, match="`data` is required"):
        load_recipe(write(tmp_path, "train: {lr: 0.001}\n"))


def test_non_mapping_recipe(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_layers_must_be_ordered(tmp_path):
    with pytest.raises(ConfigError, match="start <= end"):
        load_recipe(write(tmp_path, "adapter: {layers: [5, 2]}\ndata: {train: t.jsonl}\n"))


def test_yaml_round_trip(tmp_path):
    recipe = load_recipe(write(tmp_path, "data: {train: t.jsonl}\nquantization: {bits: 4}\n"))
    import yaml

    again = recipe_from_dict(yaml.safe_load(recipe_to_yaml(recipe)))
    assert again == recipe


@pytest.mark.parametrize("data, message", [
    ({"train": 5}, "`data.train`: expected a string or a list of strings (got 5)"),
    ({"train": []}, "`data.train`: List should have at least 1 item"),
    ({"train": ["a.jsonl", 3]}, "`data.train.1`: Input should be a valid string (got 3)"),
])
def test_a_path_or_list_field_gets_one_message_not_one_per_union_branch(data, message):
    with pytest.raises(ConfigError) as info:
        recipe_from_dict({"data": data})
    assert len(info.value.problems) == 1 and message in info.value.problems[0]


def test_known_only_needs_the_base_models_answers():
    base = {"model": {"name": "m"}, "data": {"train": "t.jsonl"}}
    assert recipe_from_dict({**base, "data": {**base["data"], "replay": {"known_only": True}}}).data.replay.known_only
    with pytest.raises(ConfigError, match="known_only needs the base model's answers"):
        recipe_from_dict({**base, "data": {**base["data"], "replay": {"path": "mine.jsonl", "known_only": True}}})


def test_contrast_needs_the_base_models_answers_and_a_system_prompt():
    data = {"train": "t.jsonl", "system_prompt": "You are the desk."}
    assert recipe_from_dict({"data": {**data, "replay": {"contrast": True}}}).data.replay.contrast
    with pytest.raises(ConfigError, match="contrast needs the base model's answers"):
        recipe_from_dict({"data": {**data, "replay": {"contrast": True, "answers": "dataset"}}})
    with pytest.raises(ConfigError, match="set data.system_prompt"):
        recipe_from_dict({"data": {"train": "t.jsonl", "replay": {"contrast": True}}})


def test_a_relative_local_model_path_is_stored_absolute(tmp_path, monkeypatch):
    """The run's recipe.yaml must find the base model from any directory (`peftkit chat RUN_DIR` elsewhere)."""
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "tpl.jinja").write_text("{{ messages }}")
    monkeypatch.chdir(tmp_path)
    text = "model: {name: models/mine, chat_template: tpl.jinja}\ndata: {train: t.jsonl}\n"
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.model.name == str(tmp_path / "models" / "mine")
    assert recipe.model.chat_template == str(tmp_path / "tpl.jinja")
    hub = load_recipe(write(tmp_path, "model: {name: Qwen/Qwen2.5-0.5B, chat_template: chatml}\ndata: {train: t.jsonl}\n"))
    assert (hub.model.name, hub.model.chat_template) == ("Qwen/Qwen2.5-0.5B", "chatml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not in the current directory: found next to the recipe, as data paths are
    assert load_recipe(write(tmp_path, text)).model.name == str(tmp_path / "models" / "mine")


def test_override_paths_are_relative_to_the_current_directory(tmp_path, monkeypatch):
    """A recipe's own paths are relative to its folder; paths typed on the command line to where the user is."""
    recipes, work = tmp_path / "recipes", tmp_path / "work"
    recipes.mkdir()
    work.mkdir()
    monkeypatch.chdir(work)
    recipe = load_recipe(write(recipes, "data: {train: t.jsonl, eval: e.jsonl}\ndeepspeed: ds.json\n"),
                         ["data.train=[mine.jsonl, sub/more.csv]", "data.heldout=h.jsonl"])
    assert recipe.data.train == [str(work / "mine.jsonl"), str(work / "sub/more.csv")]
    assert recipe.data.heldout == str(work / "h.jsonl")
    assert recipe.data.eval == str(recipes / "e.jsonl") and recipe.deepspeed == str(recipes / "ds.json")
    assert load_recipe(recipes / "recipe.yaml", ["deepspeed=my_ds.json"]).deepspeed == str(work / "my_ds.json")


@pytest.mark.parametrize(("text", "value"), [
    ("data.system_prompt=You are: a=b bot", "You are: a=b bot"),
    ("data.system_prompt=yes", "yes"),
    ("data.system_prompt=Off", "Off"),
    ("data.columns={prompt: q, response: a}", {"prompt": "q", "response": "a"}),
    ("adapter.r=8", 8),
    ("data.system_prompt=You are the #1 helper. Be brief", "You are the #1 helper. Be brief"),
    ("data.system_prompt=#1 helper", "#1 helper"),
    ("data.system_prompt='quoted # text'", "quoted # text"),
])
def test_override_text_stays_text_unless_it_is_a_yaml_value(text, value):
    assert parse_override(text)[1] == value


def test_a_yes_override_still_sets_a_boolean(tmp_path):
    recipe = load_recipe(write(tmp_path, "data: {train: t.jsonl}\n"), ["model.trust_remote_code=yes"])
    assert recipe.model.trust_remote_code is True


def test_paths_and_values_that_would_fail_later_are_said_at_load(tmp_path, monkeypatch, tiny_recipe, caplog):
    """`output_dir: ${RUNS}/x` expands as data paths do; `~nobody/x` and a seed numpy refuses are one message each;
    a GPU device on a machine without one is a warning in validate (the recipe may train elsewhere)."""
    import yaml

    from peftkit.config import load_recipe
    from peftkit.config.validate import validate_recipe

    monkeypatch.setenv("RUNS_ROOT", str(tmp_path / "runs"))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**tiny_recipe, "output_dir": "${RUNS_ROOT}/first"}))
    assert load_recipe(path).output_dir == str(tmp_path / "runs" / "first")
    monkeypatch.delenv("RUNS_ROOT")
    with pytest.raises(ConfigError, match=r"output_dir: \$RUNS_ROOT is not set in the environment"):
        load_recipe(path)
    monkeypatch.setenv("RUNS_ROOT", str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match="there is no user 'nobody-peftkit' here"):
        load_recipe(path, ["data.train=~nobody-peftkit/x.jsonl"])
    with pytest.raises(ConfigError, match="train.seed"):
        load_recipe(path, ["train.seed=-1"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING"):
        validate_recipe(load_recipe(path, ["train.device=cuda"]), check_model=False)
    assert "this machine has no CUDA GPU: `train` will refuse to start here" in caplog.text
    caplog.clear()
    from peftkit.errors import PeftkitError
    from peftkit.train.run import train

    with caplog.at_level("WARNING"), pytest.raises(PeftkitError, match="no CUDA GPU is visible; use `auto` or `cpu`"):
        train(load_recipe(path, ["train.device=cuda"]))  # the refusal alone, not the warning that it will come
    assert "refuse to start here" not in caplog.text
    with caplog.at_level("WARNING"):
        validate_recipe(load_recipe(path, ["train.eval_steps=2", "data.eval_fraction=0"]), check_model=False)
    assert "train.eval_steps is set, but there is no eval set" in caplog.text


def test_a_section_with_every_key_commented_out_takes_its_defaults(tmp_path, tiny_recipe):
    import yaml

    from peftkit.config import load_recipe

    text = yaml.safe_dump({k: v for k, v in tiny_recipe.items() if k not in ("train", "eval")})
    path = tmp_path / "recipe.yaml"
    path.write_text(text + "train:\n  # epochs: 3\neval:\n")
    recipe = load_recipe(path)
    assert recipe.train.epochs == type(recipe.train)().epochs and recipe.eval.max_new_tokens > 0


def test_validate_lists_missing_files_with_wrong_values_and_explains_tabs(tmp_path):
    from peftkit.config import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text("data:\n  train: nope.jsonl\n  heldout: nope2.jsonl\ntrain:\n  lr: -1\n")
    with pytest.raises(ConfigError) as caught:
        load_recipe(path)
    said = str(caught.value)
    assert "train.lr" in said and f"`data.train`: file {tmp_path / 'nope.jsonl'} does not exist" in said
    assert "`data.heldout`: file" in said and "(3 problems)" in said
    path.write_text("data:\n\ttrain: x.jsonl\n")
    with pytest.raises(ConfigError, match="YAML indents with spaces only: replace the tab"):
        load_recipe(path)


def test_numbers_yaml_reads_otherwise_are_explained(tmp_path, tiny_recipe):
    import yaml

    from peftkit.config import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    with pytest.raises(ConfigError, match=r"`train.max_steps` must be a whole number; YAML reads '1e3' as text.*\(e.g. 1000\)"):
        load_recipe(path, ["train.max_steps=1e3"])
    with pytest.raises(ConfigError, match=r"`name`: 2024 reads as a number; quote it"):
        load_recipe(path, ["name=2024"])
    with pytest.raises(ConfigError, match=r"`data.system_prompt`: 123 reads as a number; quote it"):
        load_recipe(path, ["data.system_prompt=123"])
    with pytest.raises(ConfigError, match=r"`data.system_prompt`: YAML reads the value as true .*quote it"):
        recipe_from_dict({**tiny_recipe, "data": {**tiny_recipe["data"], "system_prompt": True}})  # `system_prompt: yes`


def test_a_misspelt_required_key_is_reported_as_missing(tmp_path):
    from peftkit.config import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  name: x\ndata:\n  trian: a.jsonl\n")
    with pytest.raises(ConfigError) as caught:
        load_recipe(path)
    assert caught.value.problems == ["`data.train` is required but missing", "unknown key `data.trian`: did you mean `train`?"]


@pytest.mark.parametrize("method, key", [("dora", "use_dora"), ("rsLoRA", "use_rslora")])
def test_a_lora_variant_named_as_a_method_gets_its_switch(tmp_path, method, key):
    with pytest.raises(ConfigError, match=rf"is not an adapter method; choose one of: .*\({method} is LoRA with a "
                                          rf"switch: `method: lora` and `{key}: true`\)"):
        load_recipe(write(tmp_path, f"adapter: {{method: {method}}}\ndata: {{train: t.jsonl}}\n"))


@pytest.mark.parametrize("method, lr, said", [("lora", 0.5, "more than ten times the"), ("full", 5e-3, "more than ten times the"),
                                              ("lora", 1e-7, "less than a tenth of the"), ("prompt_tuning", 3e-2, None)])
def test_an_unusual_learning_rate_is_a_warning_before_training(tmp_path, tiny_recipe, caplog, method, lr, said):
    import yaml

    from peftkit.config.validate import validate_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**tiny_recipe, "adapter": {"method": method}}))
    with caplog.at_level("WARNING"):
        validate_recipe(load_recipe(path, [f"train.lr={lr}"]), check_model=False)
    if said is None:
        assert "train.lr" not in caplog.text
    else:
        assert f"train.lr {lr:g} is {said} usual rate for {method}" in caplog.text


def test_every_shipped_recipe_trains_at_a_usual_learning_rate():
    from peftkit.config.validate import learning_rate_advice

    recipes = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
    assert len(recipes) > 10
    for path in recipes:
        recipe = load_recipe(path)
        assert learning_rate_advice(recipe.adapter.method, recipe.train.lr) is None, path.name


def test_an_unclosed_quote_names_the_line_where_it_starts(tmp_path):
    text = 'data:\n  train: t.jsonl\n  system_prompt: "You are\n  eval_fraction: 0.1\nmodel: {name: x}\n'
    with pytest.raises(ConfigError, match=r"end of stream, while scanning a quoted scalar that starts at line 3 "
                                          r"\(`system_prompt: \"You are`\)"):
        load_recipe(write(tmp_path, text))


@pytest.mark.parametrize(("section", "message"), [
    ({"data": [{"train": "t.jsonl"}]}, r"`data` is a section of keys, not a list: write its keys under it without `- `"),
    ({"data": {"train": "t.jsonl"}, "adapter": [{"method": "lora"}]}, r"`adapter` is a section of keys, not a list"),
    ({"data": {"train": "t.jsonl"}, "adapter": {"method": "LoRA"}}, r"\(names are lower case: `method: lora`\)"),
    ({"data": {"train": "t.jsonl"}, "adapter": {"method": "lora", "layers": [3]}},
     r"`adapter.layers` has too few values: its item 2 is missing"),
    ({"data": {"train": "t.jsonl"}, "adapter": {"num_virtual_tokens": 8}},
     r"\(a key of `method: prefix_tuning` and `method: prompt_tuning`\)"),
    ({"data": {"train": "t.jsonl"}, "quantization": True}, r"write `quantization: \{bits: 4\}` \(QLoRA's 4-bit NF4\)"),
    ({"data": {"train": "t.jsonl"}, "train": {"lr": "-1e-3"}}, r"`train.lr`: Input should be greater than 0 \(got -1e-3\)"),
    ({"data": {"train": "t.jsonl"}, "train.lr": 1e-4},
     r"unknown key `train.lr`: in a recipe file a dotted key is written nested, `train: \{lr: 0.0001\}`"),
])
def test_a_list_for_a_section_and_a_capitalised_method_get_their_fix(section, message):
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict(section)


@pytest.mark.parametrize("section", [{"model": {"name": "${PEFTKIT_UNSET_VAR}/m"}},
                                     {"model": {"chat_template": "$PEFTKIT_UNSET_VAR/t.jinja"}},
                                     {"deepspeed": "${PEFTKIT_UNSET_VAR}/ds.json"}])
def test_an_unset_variable_in_a_model_template_or_deepspeed_path_is_named(tmp_path, monkeypatch, section):
    from peftkit.config.validate import validate_recipe

    monkeypatch.delenv("PEFTKIT_UNSET_VAR", raising=False)
    (tmp_path / "t.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}, '
                                      '{"role": "assistant", "content": "b"}]}\n')
    with pytest.raises(ConfigError, match=r"\$PEFTKIT_UNSET_VAR is not set in the environment, so it was not expanded"):
        validate_recipe(recipe_from_dict({"data": {"train": str(tmp_path / "t.jsonl")}, **section}), check_model=True)
