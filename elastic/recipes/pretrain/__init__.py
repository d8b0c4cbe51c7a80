"""Pre-training: next-token prediction on the standard library's source code; with ``--base FOLDER``, full
fine-tuning of a Hugging Face folder on ``--data`` (``recipe.py``). Either way the run writes RUN_DIR/model,
an HF folder (``model/export.py``)."""

from __future__ import annotations

from elastic.recipes.recipe import Preset, Recipe, RecipeArgs


def _build(args: RecipeArgs):
    from elastic.recipes.pretrain.recipe import finetune_config, pretrain_config

    if args.base:
        return finetune_config(args.base, args.data, steps=args.steps or 300, workers=args.workers)
    return pretrain_config(model=args.model or "mini", steps=args.steps or 300, workers=args.workers)


def _preset(args: RecipeArgs) -> Preset:
    if args.base:
        from elastic.recipes.pretrain.recipe import FINETUNE_WHY

        return Preset(why=FINETUNE_WHY)
    return Preset(toy=f"the '{args.model or 'mini'}' model preset from scratch on Python's standard library, with toy "
                      "defaults (lr 3e-3, 128-token sequences, batch 16)")


def _finish(cfg, result, run_dir, workload) -> list[str]:
    from elastic.model.export import how_to_sample
    from elastic.model.hf import load_hf_model
    from elastic.recipes.pretrain.recipe import complete, load_model

    written = result.model_folders(cfg, run_dir)
    if not written:
        return []
    saved = how_to_sample(written, cfg.train.init_from)
    if cfg.train.init_from:  # a user's model: its own tokenizer, not the byte one the samples below use
        return saved
    # A built-in preset (at most 100M parameters): sample from the folder the run wrote.
    model = load_model(cfg, result.tensors if result.tensors is not None else load_hf_model(written["model"])[1])
    return ["---\n" + text for text in complete(model, ["def ", "import "], max_new_tokens=60)] + saved


RECIPE = Recipe("pretrain", "next-token prediction on Python's standard library (--model tiny|mini|small|25m|100m)",
                _build, finish=_finish, preset=_preset)
