"""A typed command-line parser generated from the config dataclasses, and config files (TOML or YAML).

Every field of every config section becomes ``--<section>.<field>`` with its type and its help
text (``elastic.core.config.knob``), so the CLI exposes exactly the fields the Python API has; each
flag's help shows the value the run will use (the recipe's built config, given the other arguments),
not the dataclass default. TRL's and PEFT's names (``launch/trl_names.py``) are flags too
(``--learning_rate``). The sections are the core ones plus those the recipes register
(``elastic.recipes.registry`` imports every recipe). Precedence: recipe defaults < ``--config`` file <
command-line flags.

A config file holds sections (``[optim]`` tables in TOML, mappings in YAML) and flat keys in TRL's and
PEFT's names (TRL's own YAML files are all flat keys). A run's ``config.toml`` is such a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any

from elastic.core.config import CORE_SECTIONS, Config, section_types

# Sections whose fields also get a short flag, ``--<field>`` with dashes (``--snapshot-every``): the job-level
# choices people type most.
SHORT_FLAGS = ("control",)
# Single fields of other sections with a short flag too: evaluation's (``--eval-every 50 --eval-data eval.jsonl``).
SHORT_FIELDS = ("train.eval_every", "data.eval_data", "data.eval_fraction")


def _sections() -> dict[str, type]:
    import elastic.control.config  # noqa: F401 (registers the [control] section)
    import elastic.recipes.registry  # noqa: F401 (registers the recipes' config sections)

    return section_types()


def _converter(kind: Any):
    origin = typing.get_origin(kind)
    if kind is bool:
        return lambda text: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[
            text.strip().lower()]
    if origin is tuple:
        return lambda text: tuple(part.strip() for part in text.split(",") if part.strip())
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        base = _converter(inner[0]) if inner else str
        return lambda text: None if text.strip().lower() in ("none", "") else base(text)
    return kind if kind in (int, float, str) else str


def shown(value: Any) -> str:
    """A value as a flag takes it (a tuple as comma-separated names)."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else repr(value)


def add_config_flags(parser: argparse.ArgumentParser, cfg: Config | None = None, recipe: str = "") -> None:
    """``--section.field`` for every field, grouped by section, with the field's help text (and ``--field`` for the
    sections in ``SHORT_FLAGS``), then TRL's names. A boolean flag given alone means true. ``cfg``: the config the
    run would use, whose values the help shows as defaults (None: the fields' own defaults)."""
    for section, cls in _sections().items():
        group = parser.add_argument_group(f"[{section}] ({cls.__doc__.strip().splitlines()[0]})")
        hints = typing.get_type_hints(cls)
        current = None if cfg is None else getattr(cfg, section) if section in CORE_SECTIONS else (
            cfg.section(section) or (cls() if section == "control" else None))  # [control] absent: its defaults run
        for field in dataclasses.fields(cls):
            kind = hints[field.name]
            names = [f"--{section}.{field.name}"]
            if section in SHORT_FLAGS or f"{section}.{field.name}" in SHORT_FIELDS:
                names.append(f"--{field.name.replace('_', '-')}")
            extra = {"nargs": "?", "const": True} if kind is bool else {}
            if current is not None:
                default = f"default: {shown(getattr(current, field.name))}"
            elif cfg is not None:
                default = f"not in a {recipe} run; field default: {shown(field.default)}"
            else:
                default = f"field default: {shown(field.default)}"
            group.add_argument(*names, dest=f"cfg__{section}__{field.name}", default=None,
                               type=_converter(kind), metavar=getattr(kind, "__name__", "VALUE").upper(),
                               help=f"{field.metadata.get('help', '')} ({default})", **extra)
    _add_trl_flags(parser, cfg)


def _add_trl_flags(parser: argparse.ArgumentParser, cfg: Config | None) -> None:
    """TRL's names as flags (``--learning_rate 2e-4``), each typed like the field it sets (its help: that field,
    and the run's value of it when ``cfg`` has the section)."""
    from launch.trl_names import BATCH, FIELDS, INERT, ONLY

    group = parser.add_argument_group("TRL / PEFT names (SFTConfig, GRPOConfig, ModelConfig): the same settings as "
                                      "above; --model_name_or_path, --dataset_name and --output_dir are --base, "
                                      "--data and --run-dir")
    sections = _sections()
    for name, target in FIELDS.items():
        if name in ("r", "target_modules"):  # PEFT's LoraConfig names: in files; the flags are TRL's lora_r, ...
            continue
        section, key = target.split(".")
        kind = typing.get_type_hints(sections[section])[key]
        holder = None if cfg is None else getattr(cfg, section) if section in CORE_SECTIONS else cfg.section(section)
        value = "" if holder is None else f" (default: {shown(getattr(holder, key))})"
        group.add_argument(f"--{name}", dest=f"trl__{name}", default=None, type=_converter(kind),
                           metavar=getattr(kind, "__name__", "VALUE").upper(), help=f"--{target}{value}")
    for name in BATCH:
        group.add_argument(f"--{name}", dest=f"trl__{name}", type=int, metavar="INT",
                           help="x the other x the workers: train.global_batch (GRPO: / num_generations)")
    group.add_argument("--warmup_ratio", dest="trl__warmup_ratio", type=float, metavar="FLOAT",
                       help="optim.warmup_steps = ceil(ratio x train.steps)")
    group.add_argument("--lr_scheduler_type", dest="trl__lr_scheduler_type", metavar="NAME",
                       help="cosine (optim.min_lr_ratio 0) or constant_with_warmup (1)")
    group.add_argument("--use_peft", dest="trl__use_peft", type=_converter(bool), nargs="?", const=True,
                       metavar="BOOL", help="false: full fine-tuning instead of LoRA (lora, grpo)")
    group.add_argument("--bf16", dest="trl__bf16", type=_converter(bool), nargs="?", const=True, metavar="BOOL",
                       help="true: --train.mixed_precision bf16 (bf16 compute, float32 weights and AdamW moments)")
    group.add_argument("--num_train_epochs", dest="trl__num_train_epochs", type=float, metavar="FLOAT",
                       help="accepted with --max_steps only (which wins, as in transformers)")
    for name in sorted(INERT):
        group.add_argument(f"--{name}", dest=f"trl__{name}", metavar="VALUE", help="accepted, changes nothing here")
    loose = _converter(bool | None)
    for name in sorted(ONLY):  # booleans as TRL's flags spell them; other values as given
        group.add_argument(f"--{name}", dest=f"trl__{name}", metavar="VALUE", help=f"{ONLY[name][0][0]!r} only",
                           type=lambda text: loose(text) if text.lower() in ("true", "false", "none") else text)


def load_config_file(path: Path) -> tuple[dict[str, dict[str, Any]], Any]:
    """(sections, translation of its flat TRL-named keys) of a TOML (``.toml``) or YAML (``.yaml``/``.yml``)
    file; one clear error for a missing or malformed file, an unknown section or a name we do not implement."""
    from launch.trl_names import translate

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path} must be a mapping of names to values (TRL's YAML shape)")
    else:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {path} is not valid TOML: {err}") from None
    sections = {k: v for k, v in raw.items() if isinstance(v, dict)}
    unknown = sorted(set(sections) - set(_sections()))
    if unknown:
        raise ValueError(f"config file {path}: unknown sections {unknown}; known: {sorted(_sections())}")
    return sections, translate({k: v for k, v in raw.items() if k not in sections}, f"config file {path}")


def apply_overrides(cfg: Config, overrides: dict[str, dict[str, Any]]) -> Config:
    """``cfg`` with some fields replaced, section by section; validation runs again."""
    sections = _sections()
    changes = {}
    for section, values in overrides.items():
        if not values:
            continue
        cls = sections[section]
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(values) - known)
        if bad:
            raise ValueError(f"unknown fields {bad} in section [{section}]; known: {sorted(known)}")
        current = getattr(cfg, section) if section in CORE_SECTIONS else cfg.section(section)
        if isinstance(values.get("targets"), list):
            values = {**values, "targets": tuple(values["targets"])}
        changes[section] = dataclasses.replace(current, **values) if current is not None else cls(**values)
    return cfg.replace(**changes) if changes else cfg


def flag_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if key.startswith("cfg__") and value is not None:
            _, section, name = key.split("__", 2)
            out.setdefault(section, {})[name] = value
    return out


def trl_flags(args: argparse.Namespace):
    """The TRL-named flags given, translated (``launch.trl_names.translate``)."""
    from launch.trl_names import translate

    given = {key.removeprefix("trl__"): value for key, value in vars(args).items()
             if key.startswith("trl__") and value is not None}
    return translate(given, "the command line")
