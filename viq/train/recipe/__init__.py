"""Typed training recipes: a YAML base config, named stages that override it, dotted overrides.

The schema replaces the reference's ~80 environment switches (reference-training.md §1.3).
Resolution order: file (``extends`` parent first) -> ``stages[stage]`` -> ``key.path=value``
overrides -> ``${name}`` substitution from ``paths:`` -> validation.
"""

from viq.train.recipe.files import list_stages, load_recipe, validate_recipe
from viq.train.recipe.schema import Recipe
from viq.train.recipe.tree import parse_override

__all__ = ["Recipe", "list_stages", "load_recipe", "parse_override", "validate_recipe"]
