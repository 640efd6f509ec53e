"""Training: typed recipes (``recipe``); the loop, losses and checkpoints build on them."""

from viq.train.recipe import Recipe, list_stages, load_recipe, parse_override, validate_recipe

__all__ = ["Recipe", "list_stages", "load_recipe", "parse_override", "validate_recipe"]
