"""Recipes: YAML files parsed into frozen, validated config objects."""

from peftkit.config.load import load_recipe, recipe_from_dict, recipe_to_yaml
from peftkit.config.schema import Recipe

__all__ = ["Recipe", "load_recipe", "recipe_from_dict", "recipe_to_yaml"]
