"""A run's effective configuration: built from the recipe, a config file and the flags, then recorded.

``plan_run`` applies, in order of precedence: the recipe's defaults for the command's choices (recipe,
base, data, use_peft, steps, workers), the ``--config`` file's sections, its TRL-named keys and the
TRL-named flags (``launch/trl_names.py``), then the ``--section.field`` flags. Values that need the rest
of the run (TRL's per-device batch, ``warmup_ratio``) are computed last from the final steps and workers.

``write_record`` writes ``RUN_DIR/config.toml``, the effective configuration as a config file (the
command's choices as top-level TRL names, then every section; ``elastic train --config`` on it builds
the same ``Config``), and ``RUN_DIR/command.txt``, the command as typed. ``chosen_lines`` says which
defaults the recipe chose for the user. No torch.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_RECIPE = "pretrain"
DEFAULT_WORKERS = 4


@dataclass
class RunPlan:
    cfg: Any  # the effective Config
    layout: Any  # the first Layout, or None (auto)
    recipe: Any  # the Recipe
    recipe_args: Any  # the RecipeArgs it was built with
    built: Any  # the recipe's own Config, before the file and the flags
    inert: list[str] = field(default_factory=list)  # TRL names accepted that change nothing here


def _choose(args: argparse.Namespace, choices: dict[str, Any]) -> None:
    """Fill the command's choices the command line left out from the file's (or TRL flags') names."""
    for attr in ("base", "data", "run_dir", "recipe"):
        if getattr(args, attr, None) is None and choices.get(attr) is not None:
            setattr(args, attr, str(choices[attr]))
    args.recipe = args.recipe or DEFAULT_RECIPE


def plan_run(args: argparse.Namespace) -> RunPlan:
    """The run the arguments describe; ``args`` gains the file's base, data, run_dir and recipe when absent."""
    from elastic.control.config import ControlConfig
    from elastic.recipes.recipe import RecipeArgs
    from elastic.recipes.registry import get
    from launch.args import apply_overrides, flag_overrides, load_config_file, trl_flags
    from launch.trl_names import Translation, batch_override, warmup_steps

    sections, names = load_config_file(Path(args.config)) if args.config else ({}, Translation())
    names.update(trl_flags(args))
    _choose(args, names.choices)
    recipe = get(args.recipe)
    # TRL's max_steps also reaches the recipe, so that what it derives from the steps (warmup) follows them.
    steps = args.steps if args.steps is not None else names.overrides.get("train", {}).get("steps")
    recipe_args = RecipeArgs(model=args.model, steps=steps, workers=args.workers or DEFAULT_WORKERS,
                             base=args.base, data=args.data, peft=bool(names.choices.get("peft", True)))
    built = recipe.build(recipe_args)
    flags = flag_overrides(args)
    if args.config:  # the command's own --workers and --steps win over the file too
        if args.workers is not None:
            flags.setdefault("runtime", {}).setdefault("workers", args.workers)
        if args.steps is not None:  # a GRPO step is num_iterations optimizer steps, as the recipe counts them
            per_step = getattr(apply_overrides(built, sections).section("grpo"), "num_iterations", 1)
            flags.setdefault("train", {}).setdefault("steps", args.steps * per_step)
    cfg = apply_overrides(apply_overrides(built, sections), names.overrides)
    cfg = apply_overrides(cfg, flags)
    derived: dict[str, dict[str, Any]] = {}
    grpo = cfg.section("grpo")
    if names.batch:
        derived["train"] = {"global_batch": batch_override(names.batch, cfg.runtime.workers,
                                                           grpo.num_generations if grpo else None)}
    elif _batch_follows(recipe, recipe_args, cfg, built):  # a default that follows the final workers and G
        per_step = 8 * cfg.runtime.workers // (grpo.num_generations if grpo else 1)
        built = apply_overrides(built, {"train": {"global_batch": max(1, per_step)}})
        derived["train"] = {"global_batch": built.train.global_batch}
    if names.warmup_ratio is not None:
        derived["optim"] = {"warmup_steps": warmup_steps(names.warmup_ratio, cfg.train.steps)}
    derived = {s: {k: v for k, v in values.items() if k not in flags.get(s, {})} for s, values in derived.items()}
    cfg = apply_overrides(cfg, derived)
    layout = ControlConfig.of(cfg).first_layout()
    if layout is not None:
        layout.validate(cfg.model, cfg.train.global_batch)
        if layout.world > cfg.runtime.workers:
            raise ValueError(f"--layout {layout} needs {layout.world} workers but --workers is "
                             f"{cfg.runtime.workers}")
    return RunPlan(cfg, layout, recipe, recipe_args, built, names.inert)


def _batch_follows(recipe, recipe_args, cfg, built) -> bool:
    """Whether the run keeps a real-model batch default: TRL's per_device_train_batch_size 8 per worker, which
    then follows the run's final workers and num_generations (flags and files may change both)."""
    preset = recipe.preset(recipe_args) if recipe.preset else None
    return (preset is not None and "train.global_batch" in preset.why
            and cfg.train.global_batch == built.train.global_batch)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else
                                                         "inf" if value > 0 else "-inf")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def config_toml(plan: RunPlan) -> str:
    """The effective configuration as a config file: the command's choices as TRL names, then each section
    (a None field is written as a comment: TOML has no null, and the recipe's value is None too)."""
    lines = ["# The effective configuration of this run; rerun it with: elastic train --config config.toml",
             f"recipe = {_toml_value(plan.recipe.name)}"]
    rargs = plan.recipe_args
    for name, value in (("model_name_or_path", rargs.base), ("dataset_name", rargs.data)):
        if value is not None:  # a local path absolute, so that the file works from any folder
            lines.append(f"{name} = {_toml_value(Path(value).resolve() if Path(value).exists() else value)}")
    if plan.recipe.name != "pretrain":
        lines.append(f"use_peft = {_toml_value(rargs.peft)}")
    for section, values in plan.cfg.to_dict().items():
        if values is None:
            continue
        lines += ["", f"[{section}]"]
        lines += [f"# {k} = None" if v is None else f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def write_record(run_dir: Path, plan: RunPlan, argv: list[str] | None = None) -> None:
    """``config.toml`` and ``command.txt`` in the run's folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(config_toml(plan))
    argv = sys.argv if argv is None else argv
    (run_dir / "command.txt").write_text(shlex.join(["elastic", *argv[1:]]) + "\n")


def chosen_lines(plan: RunPlan) -> list[str]:
    """What the run prints about its defaults: the toy preset in one line, or the real-model defaults the user
    left as they are, with where each comes from; and the accepted TRL names that change nothing here."""
    preset = plan.recipe.preset(plan.recipe_args) if plan.recipe.preset else None
    lines = []
    if preset is not None and preset.toy:
        lines.append(f"toy preset: {preset.toy}")
    elif preset is not None:
        kept = []
        for key, why in preset.why.items():
            section, name = key.split(".")
            now, default = (_field(c, section, name) for c in (plan.cfg, plan.built))
            if now is not None and now == default:
                kept.append(f"  {key} = {now!r}  ({why})")
        if kept:
            lines += ["defaults chosen for you (each has a flag of the same name):", *kept]
    if plan.inert:
        lines.append(f"accepted, changes nothing here: {', '.join(plan.inert)}")
    return lines


def _field(cfg, section: str, name: str) -> Any:
    from elastic.core.config import CORE_SECTIONS

    holder = getattr(cfg, section) if section in CORE_SECTIONS else cfg.section(section)
    return None if holder is None else getattr(holder, name)
