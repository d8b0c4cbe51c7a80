"""A run's trained model out as Hugging Face folders that load where the user's tools load models.

At the end of a run (and for GRPO at its checkpoints), a recipe hands ``export_model`` the run's full
state by our names (``<param>``, plus ``<param>::exp_avg``-style optimizer entries, which are dropped):

- with LoRA, ``RUN_DIR/adapter``: a PEFT adapter whose ``base_model_name_or_path`` names the base so
  that ``AutoPeftModelForCausalLM.from_pretrained(RUN_DIR/adapter)`` finds it: the base folder's
  absolute path, or the string as given when it is not a local folder (a hub id such as
  ``Qwen/Qwen2.5-0.5B-Instruct``, which transformers resolves itself); ``lora.export = "merged"``
  writes ``RUN_DIR/merged`` instead, a plain HF folder with the adapter folded into the base weights
  (W + scaling * B @ A), and ``"both"`` writes the two. A LoRA run on a random base (no folder: the
  GRPO toy preset) also writes that base, ``RUN_DIR/base``, for the adapter to name;
- without LoRA (a full fine-tune, or pre-training), ``RUN_DIR/model``: a plain HF folder.

Every folder gets the base folder's tokenizer files and generation config (as TRL's ``save_model``
saves the processing class beside the model), so ``elastic generate --base RUN_DIR/model`` and
``AutoTokenizer.from_pretrained`` work on it alone. Tensors keep the run's dtype. No distributed code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from elastic.core.config import Config
from elastic.model.hf import CONFIG_NAME, export_merged, save_hf_model, token_ids_of
from elastic.model.peft_io import save_peft_adapter

EXPORTS = ("adapter", "merged", "both")
# What a model folder holds besides its weights and config.json, copied from the base when present.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
              "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "generation_config.json")


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


def _hf_folder(folder: Path, cfg: Config, state: dict[str, torch.Tensor], base: str | None) -> Path:
    has_config = bool(base) and (Path(base) / CONFIG_NAME).is_file()
    save_hf_model(folder, cfg.model, state, token_ids_of(base if has_config else None))
    copy_side_files(base, folder)
    return folder


def export_model(run_dir: str | Path, cfg: Config, tensors: dict[str, torch.Tensor],
                 how: str | None = None) -> dict[str, Path]:
    """Write the trained model under ``run_dir`` (see the module docstring); ``how``: ``lora.export`` unless
    given. Returns what was written: {"adapter" | "merged" | "base" | "model": folder}."""
    run_dir, base = Path(run_dir), cfg.train.init_from or None
    params, adapters = split_state(tensors)
    if cfg.lora is None:
        return {"model": _hf_folder(run_dir / "model", cfg, params, base)}
    how = how or getattr(cfg.lora, "export", "adapter")
    if how not in EXPORTS:
        raise ValueError(f"lora.export={how!r} is not one of {EXPORTS}")
    out: dict[str, Path] = {}
    if base is None:  # a random base exists nowhere else: write it, for the adapter to name
        out["base"] = base_dir = _hf_folder(run_dir / "base", cfg, params, None)
        base = str(base_dir)
    if how in ("adapter", "both"):
        out["adapter"] = save_peft_adapter(run_dir / "adapter", cfg.model, cfg.lora, adapters, base_model_name(base))
        copy_side_files(base, out["adapter"])
    if how in ("merged", "both"):
        out["merged"] = export_merged(run_dir / "merged", cfg.model, params, adapters, cfg.lora,
                                      token_ids_of(base if (Path(base) / CONFIG_NAME).is_file() else None))
        copy_side_files(base, out["merged"])
    return out


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
