"""A run's trained model out as Hugging Face folders that load where the user's tools load models.

What is written (``plan_export``), from the run's state by our names:

- with LoRA, ``RUN_DIR/adapter``: a PEFT adapter whose ``base_model_name_or_path`` names the base so
  that ``AutoPeftModelForCausalLM.from_pretrained(RUN_DIR/adapter)`` finds it: the base folder's
  absolute path, or the string as given when it is not a local folder (a hub id such as
  ``Qwen/Qwen2.5-0.5B-Instruct``, which transformers resolves itself); ``lora.export = "merged"``
  writes ``RUN_DIR/merged`` instead, a plain HF folder with the adapter folded into the base weights
  (W + scaling * B @ A), and ``"both"`` writes the two. A LoRA run on a random base (no folder: the
  GRPO toy preset) also writes that base, ``RUN_DIR/base``, for the adapter to name;
- without LoRA (a full fine-tune, or pre-training), ``RUN_DIR/model``: a plain HF folder.

An HF folder's weights are split as ``save_pretrained`` splits them (``huggingface_hub``'s
``split_torch_state_dict_into_shards``): one ``model.safetensors``, or past ``max_shard_size``
``model-0000i-of-0000N.safetensors`` files and a ``model.safetensors.index.json``, which transformers
reads natively. An adapter is one ``adapter_model.safetensors`` (PEFT reads no other).

A plan is files of entries, each entry one tensor in a file made from one of our tensors (or, merged,
from W, lora_A and lora_B), so a file can be written one tensor at a time (``safetensors_stream``) by
whoever holds the tensors: the workers at the end of a run (``driver/exporter.py``, so the driver never
holds the model), or ``export_model`` here from a dict in memory (``elastic export``, the library API).
The small side files (config.json, the index, adapter_config.json, the base's tokenizer and generation
config, as TRL's ``save_model`` saves the processing class beside the model) are ``write_side_files``'s.
Tensors keep the run's dtype. No distributed code.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from elastic.core.config import Config
from elastic.model.families import hf_config_dict
from elastic.model.hf import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, token_ids_of
from elastic.model.lora import LoraConfig, merge_state_dict
from elastic.model.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX, peft_adapter_config
from elastic.model.safetensors_stream import StreamWriter
from elastic.model.specs import DTYPE, param_specs

EXPORTS = ("adapter", "merged", "both")
MAX_SHARD_SIZE = "5GB"  # huggingface_hub's default for splitting a state dict (transformers 4.x's too)
# What a model folder holds besides its weights and config.json, copied from the base when present.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
              "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "generation_config.json")


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: ``key`` in the file, made from ``sources`` (our names): one tensor copied, or
    (W, lora_A, lora_B) merged."""

    key: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]


@dataclass(frozen=True)
class WeightsFile:
    path: Path
    entries: tuple[Entry, ...]

    @property
    def folder(self) -> Path:
        return self.path.parent


@dataclass(frozen=True)
class ExportPlan:
    """Every weights file of an export, and what the side files need. ``folders``: {"adapter" | "merged" |
    "base" | "model": folder}, what the run reports."""

    folders: dict[str, Path]
    files: tuple[WeightsFile, ...]
    dtype: torch.dtype
    lora: LoraConfig | None
    base: str | None  # the base folder (tokenizer, token ids; the adapter's base) as the run was given it
    indexes: dict[Path, dict] = field(default_factory=dict)  # folder -> its model.safetensors.index.json

    def sources(self) -> list[str]:
        """Our tensors the files are made of, each once, in file order."""
        return list(dict.fromkeys(s for f in self.files for e in f.entries for s in e.sources))


def base_model_name(base: str) -> str:
    """What an adapter's ``base_model_name_or_path`` says: a local folder's absolute path (so the adapter loads
    from any working directory), else the string as given (a hub id)."""
    path = Path(base).expanduser()
    return str(path.resolve()) if path.is_dir() else base


def copy_side_files(base: str | None, folder: Path) -> None:
    """The base folder's tokenizer and generation config, into ``folder`` (nothing for a byte-level model)."""
    if not base or not Path(base).is_dir():
        return
    for name in SIDE_FILES:
        if (Path(base) / name).is_file():
            shutil.copy2(Path(base) / name, folder / name)


def split_state(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model parameters, LoRA adapters) of a run's full state; optimizer entries (``name::key``) are dropped."""
    params = {k: v for k, v in tensors.items() if "::" not in k}
    adapters = {k: v for k, v in params.items() if ".lora_" in k}
    return {k: v for k, v in params.items() if k not in adapters}, adapters


def _hf_files(folder: Path, entries: list[Entry], dtype: torch.dtype, max_shard_size: int | str,
              indexes: dict[Path, dict]) -> list[WeightsFile]:
    """An HF folder's weights files, split as ``save_pretrained`` splits them (sizes from shapes: no data)."""
    meta = {e.key: torch.empty(e.shape, dtype=dtype, device="meta") for e in entries}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)
    by_key = {e.key: e for e in entries}
    if split.is_sharded:
        indexes[folder] = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        return [WeightsFile(folder / name, tuple(by_key[k] for k in keys))
                for name, keys in split.filename_to_tensors.items()]
    return [WeightsFile(folder / WEIGHTS_NAME, tuple(entries))]


def plan_export(run_dir: str | Path, cfg: Config, how: str | None = None, dtype: torch.dtype | None = None,
                max_shard_size: int | str = MAX_SHARD_SIZE) -> ExportPlan:
    """What an export of ``cfg``'s run writes under ``run_dir`` (see the module docstring); ``how``:
    ``lora.export`` unless given; ``dtype``: the tensors' (default: the run's ``train.dtype``)."""
    run_dir, base, dtype = Path(run_dir), cfg.train.init_from or None, dtype or DTYPE[cfg.train.dtype]
    specs = param_specs(cfg)
    weights = [Entry(s.name, s.shape, (s.name,)) for s in specs if ".lora_" not in s.name]
    folders, files, indexes = {}, [], {}

    def hf(what: str, entries: list[Entry]) -> None:
        folders[what] = run_dir / what
        files.extend(_hf_files(run_dir / what, entries, dtype, max_shard_size, indexes))

    if cfg.lora is None:
        hf("model", weights)
        return ExportPlan(folders, tuple(files), dtype, None, base, indexes)
    how = how or getattr(cfg.lora, "export", "adapter")
    if how not in EXPORTS:
        raise ValueError(f"lora.export={how!r} is not one of {EXPORTS}")
    if base is None:  # a random base exists nowhere else: write it, for the adapter to name
        hf("base", weights)
    if how in ("adapter", "both"):
        folders["adapter"] = run_dir / "adapter"
        adapters = tuple(Entry(PREFIX + s.name, s.shape, (s.name,)) for s in specs if ".lora_" in s.name)
        files.append(WeightsFile(run_dir / "adapter" / ADAPTER_WEIGHTS, adapters))
    if how in ("merged", "both"):
        adapted = {s.name.removesuffix(".lora_A.weight") for s in specs if s.name.endswith(".lora_A.weight")}
        merged = [Entry(e.key, e.shape, (e.key, f"{module}.lora_A.weight", f"{module}.lora_B.weight"))
                  if (module := e.key.removesuffix(".weight")) in adapted else e for e in weights]
        hf("merged", merged)
    return ExportPlan(folders, tuple(files), dtype, cfg.lora, base, indexes)


def entry_tensor(plan: ExportPlan, entry: Entry, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The tensor ``entry`` holds, from ``get(our name)``: a copy, or W + scaling * B @ A (``merge_state_dict``,
    float64), in the plan's dtype."""
    if len(entry.sources) == 1:
        return get(entry.sources[0]).to(plan.dtype)
    w, a, b = entry.sources
    return merge_state_dict({w: get(w)}, {a: get(a), b: get(b)}, plan.lora)[w].to(plan.dtype)


def file_writer(plan: ExportPlan, file: WeightsFile) -> StreamWriter:
    return StreamWriter(file.path, [(e.key, plan.dtype, e.shape) for e in file.entries])


def write_side_files(plan: ExportPlan, cfg: Config) -> None:
    """config.json (and the index of a split folder) of each HF folder, adapter_config.json, and the base's
    tokenizer and generation config in each folder; after the weights (the adapter names a written base)."""
    base = str(plan.folders["base"]) if "base" in plan.folders else plan.base
    for what, folder in plan.folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        if what == "adapter":
            config = peft_adapter_config(plan.lora, base_model_name(base))
            (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            ids = token_ids_of(base if what != "base" and base and (Path(base) / CONFIG_NAME).is_file() else None)
            config = hf_config_dict(cfg.model, plan.dtype, ids)
            (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            if folder in plan.indexes:
                (folder / INDEX_NAME).write_text(json.dumps(plan.indexes[folder], indent=2, sort_keys=True) + "\n")
        if what != "base":
            copy_side_files(base, folder)


def export_model(run_dir: str | Path, cfg: Config, tensors: dict[str, torch.Tensor], how: str | None = None,
                 max_shard_size: int | str = MAX_SHARD_SIZE) -> dict[str, Path]:
    """Write the trained model under ``run_dir`` from ``tensors`` in memory (our names; optimizer entries are
    ignored), as ``plan_export`` says, one tensor at a time. Returns {"adapter" | "merged" | "base" | "model":
    folder}."""
    params, _ = split_state(tensors)
    dtypes = {t.dtype for t in params.values()}
    if len(dtypes) != 1:
        raise ValueError(f"export_model: tensors have mixed dtypes {sorted(map(str, dtypes))}; cast them to one")
    plan = plan_export(run_dir, cfg, how, dtypes.pop(), max_shard_size)
    missing = [name for name in plan.sources() if name not in tensors]
    if missing:
        raise ValueError(f"export_model: the state lacks {missing[:5]} ({len(missing)} tensors) that the "
                         f"{', '.join(plan.folders)} export needs")
    for file in plan.files:
        out = file_writer(plan, file)
        for entry in file.entries:
            out.write(entry.key, entry_tensor(plan, entry, tensors.__getitem__))
        out.close()
    write_side_files(plan, cfg)
    return dict(plan.folders)


def how_to_sample(written: dict[str, Path], base: str | None) -> list[str]:
    """The lines a run prints: where each folder went, and the ``elastic generate`` command that samples from it."""
    lines = [f"{what}: {folder}" for what, folder in written.items()]
    prompt = '"What is 2 + 3?"'
    if "merged" in written or "model" in written:
        model = written.get("merged", written.get("model"))
        lines.append(f"sample from it: elastic generate --base {model} {prompt}")
    elif "adapter" in written:
        base_folder = written.get("base", base)
        lines.append(f"sample from it: elastic generate --base {base_folder} --adapter {written['adapter']} {prompt}")
    return lines
