"""Benchmark plumbing that decides what a report says: recipe mapping and row merging."""

from __future__ import annotations

import pytest

from benchmarks.common import markdown_table, write_csv
from benchmarks.methods import ROOT, earlier_rows, recipe_for


def test_methods_map_to_their_recipes_and_variants():
    assert recipe_for("quickstart", "lora") == (ROOT / "recipes" / "quickstart.yaml", [])
    assert recipe_for("quickstart", "prefix")[0].name == "quickstart-prefix.yaml"
    recipe, overrides = recipe_for("quickstart", "qlora-int8")
    assert recipe.name == "quickstart-qlora.yaml" and overrides == ["quantization.bits=8"]
    recipe, overrides = recipe_for("support-desk", "dora")  # no dedicated recipe: the recipe's LoRA, as DoRA
    assert recipe.name == "support-desk.yaml" and overrides == ["adapter.use_dora=true"]
    with pytest.raises(SystemExit, match="support-desk-prefix.yaml"):
        recipe_for("support-desk", "prefix")
    assert recipe_for("quickstart", "lora-replay")[1][0].startswith("data.replay.path=")


def test_rows_of_an_earlier_invocation_are_kept_unless_measured_again(tmp_path):
    stem = tmp_path / "2026-01-01_cpu2_methods"
    write_csv(stem, [
        {"recipe": "quickstart", "method": "lora", "heldout_accuracy": 0.6, "run_dir": "a"},
        {"recipe": "quickstart", "method": "full", "heldout_accuracy": 0.4, "run_dir": "b"},
    ])
    kept = earlier_rows(stem, [{"recipe": "quickstart", "method": "full"}])
    assert kept == [{"recipe": "quickstart", "method": "lora", "heldout_accuracy": 0.6, "run_dir": "a"}]
    assert markdown_table(kept, ["method", "heldout_accuracy"])[2] == "| lora | 0.6 |"
