"""Reports of a docs reader and a reviewer: `validate --show-data` on a classifier, trained runs that must stay loadable
and resumable under newer recipe rules."""

from __future__ import annotations

import pytest
import yaml

from peftkit.cli import main
from tests.conftest import write_jsonl


def test_show_data_of_a_classifier_shows_each_text_with_its_label(tiny_model_dir, tmp_path, capsys):
    """It printed the chat-training view (the text as a trained reply, no label), or failed on a tokenizer without
    an end-of-sequence token with advice about chat templates."""
    rows = [{"text": f"great movie number {i}", "label": "positive"} for i in range(4)]
    rows += [{"text": f"terrible food number {i}", "label": "negative"} for i in range(4)]
    recipe = {"task": "sequence_classification", "model": {"name": str(tiny_model_dir)},
              "adapter": {"method": "lora", "r": 4, "alpha": 8},
              "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", rows)), "eval_fraction": 0.25},
              "train": {"max_steps": 2}, "output_dir": str(tmp_path / "run")}
    path = tmp_path / "cls.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(path), "--show-data", "3"]) == 0
    out = capsys.readouterr().out
    shown = [line for line in out.splitlines() if line.startswith("--- row ")]
    assert len(shown) == 3 and all("train.jsonl:" in line for line in shown)
    assert all(("label 'positive'" in line) or ("label 'negative'" in line) for line in shown)
    assert "[[" not in out and "<|im_end|>" not in out  # no chat template, no trained-token marks
    texts = [line for line in out.splitlines() if "number" in line and not line.startswith("---")]
    assert len(texts) == 3


def test_an_8_bit_run_recorded_with_its_unused_4_bit_keys_still_resumes(tmp_path):
    """Earlier versions wrote nf4 / double_quant / compute_dtype into an 8-bit run's recipe.yaml; the recipe now leaves
    them out. A run started before must still resume, while a run whose quantization went away must not."""
    from peftkit.config import recipe_from_dict
    from peftkit.train.run_dir import recipe_changes

    data = {"train": str(tmp_path / "train.jsonl")}
    eight_bit = recipe_from_dict({"adapter": {"method": "qlora"}, "quantization": {"bits": 8}, "data": data}
                                 ).model_dump(mode="json")
    assert "quant_type" not in eight_bit["quantization"]
    older = {**eight_bit, "quantization": {**eight_bit["quantization"], "quant_type": "nf4", "double_quant": True}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(older))
    assert recipe_changes(tmp_path, eight_bit) == []
    unquantized = recipe_from_dict({"adapter": {"method": "lora"}, "data": data}).model_dump(mode="json")
    assert any(change.startswith("quantization.bits: 8 -> None") for change in recipe_changes(tmp_path, unquantized))


def test_a_trained_runs_recipe_loads_although_newer_rules_refuse_settings_it_ignored(tmp_path):
    """A classifier trained with a system prompt (ignored then, refused now) or an 8-bit run with a 4-bit key must stay
    loadable for export, eval and chat; a new recipe with them is refused."""
    from peftkit.config import recipe_from_dict
    from peftkit.errors import ConfigError
    from peftkit.runs import read_run_recipe

    data = {"train": str(tmp_path / "train.jsonl")}
    for recipe in ({"task": "sequence_classification", "data": {**data, "system_prompt": "You classify reviews."}},
                   {"adapter": {"method": "qlora"}, "quantization": {"bits": 8, "compute_dtype": "bfloat16"}, "data": data}):
        with pytest.raises(ConfigError):
            recipe_from_dict(recipe)
        run = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
        run.mkdir()
        (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        assert read_run_recipe(run).data.train == data["train"]


def test_a_resume_still_notices_an_entry_removed_from_a_free_form_mapping(tmp_path):
    from peftkit.config import recipe_from_dict
    from peftkit.train.run_dir import recipe_changes

    roles = {"customer": "user", "agent": "assistant"}
    data = {"train": str(tmp_path / "train.jsonl"), "columns": {"messages": "turns", "roles": roles}}
    current = recipe_from_dict({"data": data}).model_dump(mode="json")
    stored = recipe_from_dict({"data": {**data, "columns": {"messages": "turns", "roles": {**roles, "boss": "system"}}}}
                              ).model_dump(mode="json")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(stored))
    assert recipe_changes(tmp_path, current) == ["data.columns.roles.boss: 'system' -> None"]
