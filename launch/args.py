"""A typed command-line parser generated from the config dataclasses, and TOML config files.

Every field of every config section becomes ``--<section>.<field>`` with its type and its help
text (``elastic.core.config.knob``), so the CLI exposes exactly the fields the Python API has. The
sections are the core ones plus those the recipes register (``elastic.recipes.registry`` imports
every recipe). Precedence: recipe defaults < ``--config file.toml`` < command-line flags.
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


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """``--section.field`` for every field, grouped by section, with the field's help text (and ``--field`` for the
    sections in ``SHORT_FLAGS``). A boolean flag given alone means true."""
    for section, cls in _sections().items():
        group = parser.add_argument_group(f"[{section}] ({cls.__doc__.strip().splitlines()[0]})")
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            kind = hints[field.name]
            names = [f"--{section}.{field.name}"]
            if section in SHORT_FLAGS:
                names.append(f"--{field.name.replace('_', '-')}")
            extra = {"nargs": "?", "const": True} if kind is bool else {}
            group.add_argument(*names, dest=f"cfg__{section}__{field.name}", default=None,
                               type=_converter(kind), metavar=getattr(kind, "__name__", "VALUE").upper(),
                               help=f"{field.metadata.get('help', '')} (field default: {field.default!r})", **extra)


def load_toml(path: Path) -> dict[str, dict[str, Any]]:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"config file {path} is not valid TOML: {err}") from None
    unknown = sorted(set(raw) - set(_sections()))
    if unknown:
        raise ValueError(f"config file {path}: unknown sections {unknown}; known: {sorted(_sections())}")
    return raw


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
