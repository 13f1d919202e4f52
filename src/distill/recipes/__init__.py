"""Built-in end-to-end recipes: data, teacher(s), students, evaluation, report. One module per recipe holds all of
it (its config model with its defaults, its run, its report and its `distill run` flags) and ends in `RECIPE`;
`RECIPES` is the table of them, and `run_recipe` (in `recipe.py`, with the `Recipe` type) runs one into a folder.
"""

from __future__ import annotations

from distill.recipes import digits, lm, mnist1d, reasoning, sst2, stsb
from distill.recipes.recipe import Recipe, run_recipe

RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (mnist1d.RECIPE, digits.RECIPE, stsb.RECIPE, sst2.RECIPE, lm.RECIPE, reasoning.RECIPE)
}

__all__ = ["RECIPES", "Recipe", "run_recipe"]
