"""What a recipe is: a named way to build a run's config, its driver-side workload and its ending.

A recipe lives in its own folder (``recipes/<name>/``): its config section if it has one, its pure
training math, its worker-side tasks, its driver-side workload and what it does when the run ends
(export adapters, print samples), and which of its defaults a run got (``Preset``: a built-in toy
preset's, or real-model ones with their reasons). Its package defines ``RECIPE``; ``registry.py`` lists the recipes.
Adding a recipe means adding one folder and one registry line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elastic.core.config import Config


@dataclass(frozen=True)
class RecipeArgs:
    """The command line's common choices, as every recipe reads them (None: the recipe's default)."""

    model: str | None = None
    steps: int | None = None
    workers: int = 4
    base: str | None = None
    data: str | None = None  # a data file in a TRL format (JSON, JSONL, Parquet)
    peft: bool = True  # TRL's use_peft: LoRA adapters on a frozen base; False: full fine-tuning (lora, grpo)


@dataclass(frozen=True)
class Preset:
    """Which defaults a run got: a built-in toy preset's (``toy`` says what it is, in one line), or the real-model
    ones, with the reason each was chosen (``why``: "section.field" -> its source, e.g. TRL's default)."""

    toy: str = ""  # e.g. "the built-in arithmetic task on a 1M-parameter model"; empty: real-model defaults
    why: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str  # one line, shown by ``elastic train --help``
    build: Callable[[RecipeArgs], Config]  # the recipe's config for these choices (raises ValueError on bad ones)
    workload: Callable[[Config], Any] | None = None  # the driver-side workload; None: next-token prediction
    # After the run: (cfg, result, run_dir, workload) -> lines to print (e.g. where adapters were written).
    finish: Callable[[Config, Any, Path, Any], list[str]] | None = None
    # The recipe's own config sections (registered when its package is imported), for ``--help`` and TOML.
    sections: tuple[type, ...] = ()
    # Which defaults ``build`` chose for these choices, for the line a run prints when it starts.
    preset: Callable[[RecipeArgs], Preset] | None = None  # None: real-model defaults with no reasons to print
