"""axolotl / LLaMA-Factory / TRL recipes brought along: every foreign key points at peftkit's own."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from peftkit.config import load_recipe
from peftkit.config.load import ALIAS_NOTES, KEY_ALIASES, NOT_NEEDED, SECTION_SHORTHANDS, _section_class
from peftkit.config.schema import ADAPTER_CLASSES, Recipe
from peftkit.errors import ConfigError


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    (tmp_path / "a.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ConfigError) as caught:
        load_recipe(path)
    return caught.value.problems


@pytest.mark.parametrize("key", sorted(KEY_ALIASES))
def test_every_alias_target_is_a_schema_field(key):
    section, _, leaf = KEY_ALIASES[key].rpartition(".")
    cls = _section_class(tuple(section.split(".")))
    classes = ADAPTER_CLASSES if section == "adapter" else (cls,)
    assert cls is not None and any(leaf in c.model_fields for c in classes), KEY_ALIASES[key]
    assert key not in NOT_NEEDED


def test_tables_name_real_keys():
    assert set(ALIAS_NOTES) <= set(KEY_ALIASES)
    assert set(SECTION_SHORTHANDS) <= set(Recipe.model_fields)
    assert not set(NOT_NEEDED) & set(Recipe.model_fields)


def test_flat_axolotl_keys_at_the_top_level_name_the_full_path(tmp_path):
    found = problems(tmp_path, "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\nsequence_len: 512\nlora_r: 16\n"
                               "lora_alpha: 32\nlora_dropout: 0.05\nlora_target_linear: true\nmicro_batch_size: 2\n"
                               "gradient_accumulation_steps: 4\nnum_epochs: 1\nlearning_rate: 0.0002\n"
                               "train_on_inputs: false\ndata: {train: a.jsonl}\n")
    for wrong, right in [("base_model", "model.name"), ("sequence_len", "data.max_seq_len"), ("lora_r", "adapter.r"),
                         ("lora_alpha", "adapter.alpha"), ("lora_dropout", "adapter.dropout"),
                         ("lora_target_linear", "adapter.target_modules"), ("micro_batch_size", "train.batch_size"),
                         ("gradient_accumulation_steps", "train.grad_accum"), ("num_epochs", "train.epochs"),
                         ("learning_rate", "train.lr"), ("train_on_inputs", "data.train_on_prompt")]:
        assert any(p.startswith(f"unknown key `{wrong}`: did you mean `{right}`?") for p in found), (wrong, found)
    assert not any("did you mean `name`" in p for p in found)  # top-level `name` is the run's title, not the model
    assert any("`lora_target_linear: true` is `target_modules: all-linear`" in p for p in found)


def test_axolotl_field_names_inside_data_columns_name_ours(tmp_path):
    """`field_messages` got its hint by spelling, `message_field_role` / `message_field_content` none."""
    found = problems(tmp_path, "data: {train: a.jsonl, columns: {field_messages: conv, message_field_role: from, "
                               "message_field_content: value}}\n")
    for wrong, right in [("field_messages", "messages"), ("message_field_role", "role"),
                         ("message_field_content", "content")]:
        assert any(p.startswith(f"unknown key `data.columns.{wrong}`: did you mean `{right}`?") for p in found), found


def test_llama_factory_keys(tmp_path):
    found = problems(tmp_path, "model_name_or_path: x/y\nstage: sft\ndo_train: true\nfinetuning_type: lora\n"
                               "lora_rank: 8\nlora_target: all\ntemplate: chatml\ncutoff_len: 1024\n"
                               "per_device_train_batch_size: 1\nnum_train_epochs: 3.0\nload_in_4bit: true\n"
                               "load_in_8bit: true\ndataset: cafe\ndata: {train: a.jsonl}\n")
    for wrong, right in [("model_name_or_path", "model.name"), ("finetuning_type", "adapter.method"),
                         ("lora_rank", "adapter.r"), ("lora_target", "adapter.target_modules"),
                         ("template", "model.chat_template"), ("cutoff_len", "data.max_seq_len"),
                         ("per_device_train_batch_size", "train.batch_size"), ("num_train_epochs", "train.epochs"),
                         ("load_in_4bit", "quantization.bits"), ("load_in_8bit", "quantization.bits"),
                         ("dataset", "data.train")]:
        assert any(p.startswith(f"unknown key `{wrong}`: did you mean `{right}`?") for p in found), (wrong, found)
    assert "unknown key `stage` is not needed: peftkit always runs supervised fine-tuning (LLaMA-Factory's " \
           "`stage: sft`); remove it" in found
    assert any(p.startswith("unknown key `do_train` is not needed:") and p.endswith("remove it") for p in found)
    assert not any("deepspeed.stage" in p or "did you mean `train`" in p for p in found)  # `sft` is no ZeRO stage
    assert any("`load_in_4bit: true` is `quantization: {bits: 4}`" in p for p in found)


def test_nested_aliases_name_the_key_in_its_section_and_the_path_elsewhere(tmp_path):
    found = problems(tmp_path, "model: {model_name_or_path: x}\n"
                               "adapter: {method: lora, lora_rank: 8, lora_target: all, gradient_checkpointing: true}\n"
                               "data: {train: a.jsonl, type: alpaca, template: chatml, packing: true, max_length: 64,\n"
                               "       completion_only_loss: true, assistant_only_loss: true, dataset_text_field: t}\n"
                               "train: {val_set_size: 0.1, learning_rate: 0.001, bf16: true}\n")
    for wrong, right in [("model.model_name_or_path", "name"), ("adapter.lora_rank", "r"),
                         ("adapter.lora_target", "target_modules"),
                         ("adapter.gradient_checkpointing", "train.gradient_checkpointing"), ("data.type", "format"),
                         ("data.template", "model.chat_template"), ("data.packing", "train.packing"),
                         ("data.max_length", "max_seq_len"), ("data.completion_only_loss", "train_on_prompt"),
                         ("data.assistant_only_loss", "train_on_prompt"), ("data.dataset_text_field", "columns"),
                         ("train.val_set_size", "data.eval_fraction"), ("train.learning_rate", "lr"),
                         ("train.bf16", "dtype")]:
        assert any(p.startswith(f"unknown key `{wrong}`: did you mean `{right}`?") for p in found), (wrong, found)
    assert not any("eval_steps" in p for p in found)
    assert any("in the opposite sense: `completion_only_loss: true` is `train_on_prompt: false`" in p for p in found)


@pytest.mark.parametrize(("recipe", "message"), [
    pytest.param("adapter: {method: prefix_tuning, lora_r: 8}\ndata: {train: a.jsonl}\n",
                 "`lora_r` is not a parameter of adapter method `prefix_tuning` (its parameters: method, "
                 "num_virtual_tokens, prefix_projection, encoder_hidden_size); remove it from the recipe's adapter "
                 "section (another method's key)",
                 id="another-adapter-methods-key-says-which-parameters-there-are"),
    pytest.param("lr: 0.001\ndata: {train: a.jsonl}\n", "unknown key `lr`: did you mean `train.lr`?",
                 id="top-level-leaf-names-still-find-their-section"),
    pytest.param("data: {train: a.jsonl, columns: {type: x}}\n",
                 "unknown key `data.columns.type` (valid keys here: messages, role, content, roles, prompt, input, "
                 "response, system, text, label)",
                 id="a-common-word-under-data-columns-is-not-data-format"),
])
def test_one_misplaced_key_gets_exactly_one_message(tmp_path, recipe, message):
    assert problems(tmp_path, recipe) == [message]


def test_section_given_as_a_single_value(tmp_path):
    found = problems(tmp_path, "model: HuggingFaceTB/SmolLM2-135M-Instruct\nadapter: lora\nquantization: 4\n"
                               "train: fast\ndata: a.jsonl\n")
    assert "`adapter` is a section of keys, not a single value (got 'lora'): write `adapter: {method: lora}`" in found
    assert ("`model` is a section of keys, not a single value (got 'HuggingFaceTB/SmolLM2-135M-Instruct'): write "
            "`model: {name: HuggingFaceTB/SmolLM2-135M-Instruct}`") in found
    assert "`data` is a section of keys, not a single value (got 'a.jsonl'): write `data: {train: a.jsonl}`" in found
    assert "`quantization` is a section of keys, not a single value (got 4): write `quantization: {bits: 4}`" in found
    assert any(p.startswith("`train` is a section of keys, not a single value (got 'fast'): write its keys") for p in found)
    assert not any("valid dictionary" in p for p in found)


ENTRIES_FIX = "`data.train` takes a data file or a list of them, not axolotl's dataset entries: write "


@pytest.mark.parametrize(("recipe", "expected"), [
    pytest.param("data: {train: a.jsonl, format: chat_template}\n",
                 "`data.format`: 'chat_template' is not a peftkit format name; peftkit calls it `chat`: write "
                 "`format: chat` (or leave `format` out: each record's format is detected)", id="format-name"),
    pytest.param("data:\n  train:\n    - {path: a.jsonl, type: sharegpt}\n    - {path: b.jsonl, type: alpaca}\n",
                 ENTRIES_FIX + "`train: [a.jsonl, b.jsonl]`; each file's format is detected, or set `data.format`",
                 id="dataset-entries-one-message-with-their-paths"),
    pytest.param("data:\n  train:\n    - path: a.jsonl\n      type: chat_template\n"
                 "      field_messages: conversations\n"
                 "      message_property_mappings: {role: from, content: value}\n"
                 "      roles: {user: [human], assistant: [gpt]}\n",
                 ENTRIES_FIX + "`train: [a.jsonl]`; axolotl's field mappings are written as `data.columns: {messages: "
                 "conversations, role: from, content: value, roles: {human: user, gpt: assistant}}` "
                 "(`data.format` stays auto)", id="field-mappings-become-columns"),
    pytest.param("data:\n  train: {path: a.jsonl, type: chat_template, field_messages: messages,\n"
                 "          message_property_mappings: {role: role, content: content}}\n",
                 ENTRIES_FIX + "`train: [a.jsonl]`; each file's format is detected, or set `data.format`",
                 id="default-field-mappings-need-no-columns"),
])
def test_axolotl_data_settings_get_one_message_saying_what_to_write(tmp_path, recipe, expected):
    assert problems(tmp_path, recipe) == [expected]


def test_top_level_axolotl_datasets(tmp_path):
    found = problems(tmp_path, "datasets:\n  - {path: a.jsonl, type: completion, field: body}\n")
    assert ("unknown key `datasets`: did you mean `data.train`? It takes a data file or a list of them, not axolotl's "
            "dataset entries: write `data: {train: [a.jsonl]}`; axolotl's field mappings are written as "
            "`data.columns: {text: body}` (`data.format` stays auto)") in found


def test_axolotl_datasets_inside_data(tmp_path):
    found = problems(tmp_path, "data:\n  datasets: [{path: a.jsonl, type: alpaca}]\n")
    assert ("unknown key `data.datasets`: did you mean `train`? It takes a data file or a list of them, not axolotl's "
            "dataset entries: write `train: [a.jsonl]`; each file's format is detected, or set `data.format`") in found


def test_the_migration_guide_lists_every_key_validate_knows():
    """docs/migrating.md is the table of KEY_ALIASES and NOT_NEEDED: a key added to one must be added to the other."""
    guide = (Path(__file__).parents[2] / "docs" / "migrating.md").read_text(encoding="utf-8")
    missing = [k for k, v in KEY_ALIASES.items() if f"| `{k}` | `{v}` |" not in guide]
    missing += [k for k in NOT_NEEDED if f"| `{k}` |" not in guide]
    assert not missing, f"docs/migrating.md lacks {missing}"


def test_a_number_given_as_stage_is_a_zero_stage(tmp_path):
    assert problems(tmp_path, "stage: 3\ndata: {train: a.jsonl}\n") == ["unknown key `stage`: did you mean `deepspeed.stage`?"]
    assert problems(tmp_path, "stage: sft\ndata: {train: a.jsonl}\n") == [
        "unknown key `stage` is not needed: peftkit always runs supervised fine-tuning (LLaMA-Factory's `stage: sft`); "
        "remove it"]


@pytest.mark.parametrize(("section", "wrong", "expected"), [
    ("quantization: {type: nf4}", "data.format", "unknown key `quantization.type` (valid keys here: bits, quant_type,"),
    ("adapter: {method: lora, type: lora}", "data.format", "`type` is not a parameter of adapter method `lora`"),
    ("model: {name: x, type: llama}", "data.format", "unknown key `model.type` (valid keys here: name,"),
    ("train: {type: x}", "data.format", "unknown key `train.type`: did you mean `dtype`?"),
    ("deepspeed: {type: x}", "data.format", "unknown key `deepspeed.type` (valid keys here: stage,"),
    ("eval: {max_length: 100}", "data.max_seq_len", "unknown key `eval.max_length` (valid keys here: max_new_tokens,"),
    ("deepspeed: {stage: 2, rank: 8}", "adapter.r", "unknown key `deepspeed.rank` (valid keys here: stage,"),
    ("eval: {dataset: e.jsonl}", "data.train", "unknown key `eval.dataset` (valid keys here: max_new_tokens,"),
    ("eval: {micro_batch_size: 2}", "train.batch_size", "unknown key `eval.micro_batch_size`: did you mean `batch_size`?"),
])
def test_common_words_and_close_spellings_inside_a_section_are_not_taken_for_another_sections_key(
        tmp_path, section, wrong, expected):
    found = problems(tmp_path, f"{section}\ndata: {{train: a.jsonl}}\n")
    assert len(found) == 1 and found[0].startswith(expected) and wrong not in found[0], found


def test_common_words_at_the_top_level_still_name_their_section(tmp_path):
    found = problems(tmp_path, "type: alpaca\nrank: 8\nmax_length: 512\ndata: {train: a.jsonl}\n")
    for wrong, right in [("type", "data.format"), ("rank", "adapter.r"), ("max_length", "data.max_seq_len")]:
        assert f"unknown key `{wrong}`: did you mean `{right}`?" in found, found


def test_val_set_size_says_that_eval_fraction_is_a_fraction(tmp_path):
    [found] = problems(tmp_path, "val_set_size: 100\ndata: {train: a.jsonl}\n")
    assert found.startswith("unknown key `val_set_size`: did you mean `data.eval_fraction`? (a fraction of the "
                            "training data below 1, e.g. 0.05; a count of examples")
    assert "`data.max_eval_examples: 100`" in found
    (tmp_path / "recipe.yaml").write_text("data: {train: a.jsonl, eval_fraction: 0.05, max_eval_examples: 100}\n")
    data = load_recipe(tmp_path / "recipe.yaml").data  # the note's spelling validates
    assert (data.eval_fraction, data.max_eval_examples) == (0.05, 100)


def test_axolotl_hub_ids_become_hf_sources(tmp_path):
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "chats").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    found = problems(tmp_path, "datasets:\n  - {path: mhenrichsen/alpaca_2k_test, type: alpaca}\n"
                               "  - {path: local/chats, type: chat_template}\n  - {path: data/x.jsonl, type: alpaca}\n")
    [hint] = [p for p in found if p.startswith("unknown key `datasets`")]
    written = hint.split("write `")[1].split("`")[0]
    assert yaml.safe_load(written) == {"data": {"train": ["hf:mhenrichsen/alpaca_2k_test", "local/chats", "data/x.jsonl"]}}
    found = problems(tmp_path, "data:\n  train: [{path: tatsu-lab/alpaca, type: alpaca}]\n")
    assert found[0].startswith("`data.train` takes a data file or a list of them, not axolotl's dataset entries: write "
                               "`train: ['hf:tatsu-lab/alpaca']`")


def test_trl_and_axolotl_keys_a_trial_met_get_their_peftkit_names(tmp_path):
    """A TRL SFTConfig and an axolotl config brought along got only "unknown key ... (valid keys here: ...)" for
    these, and `overwrite_output_dir` / `model_type` were pointed at `output_dir` / `model` by spelling."""
    found = problems(tmp_path, "dataset_name: trl-lib/Capybara\nuse_peft: true\nlora_modules_to_save: [lm_head]\n"
                               "per_device_eval_batch_size: 4\ntorch_dtype: bfloat16\nmodel_max_length: 512\n"
                               "default_system_message: Be brief.\nevals_per_epoch: 4\neval_strategy: steps\n"
                               "overwrite_output_dir: true\nmodel_type: AutoModelForCausalLM\n"
                               "resume_from_checkpoint: true\nmax_samples: 100\ndata: {train: a.jsonl}\n")
    for wrong, right in [("dataset_name", "data.train"), ("use_peft", "adapter.method"),
                         ("lora_modules_to_save", "adapter.modules_to_save"), ("per_device_eval_batch_size", "eval.batch_size"),
                         ("torch_dtype", "train.dtype"), ("model_max_length", "data.max_seq_len"),
                         ("default_system_message", "data.system_prompt"), ("evals_per_epoch", "train.eval_steps"),
                         ("eval_strategy", "train.eval_steps")]:
        assert any(p.startswith(f"unknown key `{wrong}`: did you mean `{right}`?") for p in found), (wrong, found)
    assert any("`hf:OWNER/NAME`" in p for p in found if p.startswith("unknown key `dataset_name`"))
    for key, why in [("overwrite_output_dir", "--force"), ("model_type", "follows from `task`"),
                     ("resume_from_checkpoint", "--resume"), ("max_samples", "shorter file")]:
        assert any(p.startswith(f"unknown key `{key}` is not needed:") and why in p for p in found), (key, found)


def test_another_tools_template_name_is_told_to_leave_the_key_out():
    from peftkit.models.load import chat_template_setting_problem

    for name in ("tokenizer_default", "llama3", "qwen_25"):
        assert "Leave model.chat_template out to use the tokenizer's own template" in chat_template_setting_problem(name)
    missing = chat_template_setting_problem("templates/mine.jinja")
    assert "existing template file" in missing and "another tool's template name" not in missing  # a path is a path


def test_foreign_keys_inside_a_section_keep_that_sections_hints(tmp_path):
    """A review found the new top-level names reaching into sections: `model_type` under `adapter` was "not needed"
    (it is another method's key there), `eval.max_samples` was told about data.train, `train.eval_batch_size` was an
    alias of eval.batch_size behind a close spelling of train's own `batch_size`."""
    found = problems(tmp_path, "adapter: {method: lora, model_type: x}\neval: {max_samples: 5}\ndata: {train: a.jsonl}\n")
    assert any(p.startswith("`model_type` is not a parameter of adapter method `lora`") for p in found), found
    assert not any("is not needed" in p for p in found), found
    found = problems(tmp_path, "use_peft: false\ndata: {train: a.jsonl}\n")
    assert any("`false` is `method: full`" in p for p in found), found
    found = problems(tmp_path, "max_eval_samples: 50\ndata: {train: a.jsonl}\n")
    assert any(p.startswith("unknown key `max_eval_samples`: did you mean `data.max_eval_examples`?") for p in found)
