"""LoRA fine-tuning of a Hugging Face model folder (Llama, Qwen2, Qwen3, Mistral), with PEFT adapters
out (``recipe.py``) and a learning-rate sweep (``sweep.py``)."""

from __future__ import annotations

import os
from pathlib import Path

from elastic.recipes.recipe import Preset, Recipe, RecipeArgs


def _build(args: RecipeArgs):
    from elastic.recipes.lora.recipe import lora_config

    base = args.base or os.environ.get("ELASTIC_BASE")
    if not base or not (Path(base) / "config.json").is_file():
        raise ValueError("the lora recipe needs --base FOLDER, a Hugging Face model folder "
                         "(make one with: python examples/pretrain.py --save runs/pretrain/base)")
    return lora_config(base, steps=args.steps or 200, workers=args.workers, data=args.data, real=bool(args.data),
                       peft=args.peft)


def _preset(args: RecipeArgs) -> Preset:
    """A user's --data gets real-model defaults; without it the built-in arithmetic task is a toy preset."""
    if not args.data:
        return Preset(toy="the built-in arithmetic task with toy defaults (lr 3e-3, 16-token sequences, batch 32); "
                          "--data FILE trains on your data with real-model defaults")
    from elastic.recipes.lora.recipe import REAL_WHY

    return Preset(why=REAL_WHY)


def _finish(cfg, result, run_dir: Path, workload) -> list[str]:
    """A PEFT adapter and/or a merged folder (``lora.export``), or a full fine-tune's HF folder (use_peft false)."""
    from elastic.model.export import how_to_sample

    written = result.model_folders(cfg, run_dir)
    return how_to_sample(written, cfg.train.init_from) if written else []


RECIPE = Recipe("lora", "LoRA fine-tuning of --base (a Hugging Face folder) on --data; writes PEFT adapters",
                _build, finish=_finish, preset=_preset)
