"""Pre-training: next-token prediction on the standard library's source code (``recipe.py``)."""

from __future__ import annotations

from elastic.recipes.recipe import Preset, Recipe, RecipeArgs


def _build(args: RecipeArgs):
    from elastic.recipes.pretrain.recipe import pretrain_config

    return pretrain_config(model=args.model or "mini", steps=args.steps or 300, workers=args.workers)


def _preset(args: RecipeArgs) -> Preset:
    return Preset(toy=f"the '{args.model or 'mini'}' model preset from scratch on Python's standard library, with toy "
                      "defaults (lr 3e-3, 128-token sequences, batch 16)")


def _finish(cfg, result, run_dir, workload) -> list[str]:
    if result.tensors is None:
        return []
    from elastic.recipes.pretrain.recipe import complete, load_model

    model = load_model(cfg, result.tensors)
    return ["---\n" + text for text in complete(model, ["def ", "import "], max_new_tokens=60)]


RECIPE = Recipe("pretrain", "next-token prediction on Python's standard library (--model tiny|mini|small|25m|100m)",
                _build, finish=_finish, preset=_preset)
