"""Every shipped recipe parses and validates (data files and model structure included)."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.config import load_recipe
from peftkit.config.validate import validate_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_validates(path):
    recipe = load_recipe(path)
    validate_recipe(recipe, check_model=True)
    assert recipe.output_dir.startswith("runs/"), "shipped recipes write under runs/"
