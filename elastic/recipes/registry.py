"""The recipes the ``elastic`` command knows, by name. One line per recipe.

Importing a recipe's package also registers its config sections (``core.config.register_section``),
so the CLI's flags, TOML files and ``Config.from_dict`` know them once this module is imported.
"""

from __future__ import annotations

from elastic.recipes import grpo, lora, pretrain
from elastic.recipes.recipe import Recipe

RECIPES: dict[str, Recipe] = {r.name: r for r in (pretrain.RECIPE, lora.RECIPE, grpo.RECIPE)}


def get(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]
