"""Hugging Face model folders in and out: ``config.json`` plus safetensors weights.

``load_hf_model`` reads a local folder written by ``save_pretrained`` of a Llama, Qwen2, Qwen3 or
Mistral causal LM (one ``model.safetensors``, or shards listed in ``model.safetensors.index.json``;
any float dtype, bf16 included) and returns our ``ModelConfig`` and a state dict with our parameter
names (which are HF's). ``elastic.model.families`` decides what a config means and refuses what our
decoder does not compute.

Tied embeddings (``tie_word_embeddings``) stay tied: the model has no ``lm_head.weight`` of its own
(a file that still carries one must hold the embedding's values), and ``save_hf_model`` writes a
tied folder back.

``save_hf_model`` writes a folder transformers loads (config.json + model.safetensors) and
``export_merged`` one with LoRA adapters folded into the base weights. Only safetensors are read or
written: pickle-based ``.bin`` checkpoints are refused. No distributed code here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from elastic.core.boxes import slices
from elastic.core.config import ModelConfig
from elastic.core.tokenizer import BOS, EOS, PAD, TOKENIZER_FILES, VOCAB_SIZE
from elastic.model.families import hf_config_dict, model_config_from_hf, read_hf_config
from elastic.model.llama import tensor_specs
from elastic.model.lora import LoraConfig, lora_tensor_specs, merge_state_dict

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
# Buffers some older checkpoints carry; our model recomputes them.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
BYTE_TOKEN_IDS = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; a missing or malformed file is a clear error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{what}: {path} is not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{what}: {path} must hold a JSON object, found {type(raw).__name__}")
    return raw


def model_config_of(folder: str | Path) -> ModelConfig:
    """Our ModelConfig of a local HF model folder (see ``elastic.model.families``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Hugging Face model folder {folder} does not exist")
    read_json(folder / CONFIG_NAME, "Hugging Face model config")  # a clear error for a broken file
    return model_config_from_hf(read_hf_config(folder), str(folder / CONFIG_NAME))


def tokenizer_of_folder(base: str | Path, model: ModelConfig) -> str:
    """The folder itself when it holds a tokenizer; "" (bytes) for a byte-vocabulary model without one."""
    if any((Path(base) / name).is_file() for name in TOKENIZER_FILES):
        return str(base)
    if model.vocab_size == VOCAB_SIZE:
        return ""  # one of our own byte-level models (examples/pretrain.py --save)
    raise ValueError(f"{base} has no tokenizer (none of {list(TOKENIZER_FILES)}) and its vocab_size="
                     f"{model.vocab_size} is not the byte tokenizer's {VOCAB_SIZE}; save the model's tokenizer "
                     "into the folder (tokenizer.save_pretrained)")


def token_ids_of(folder: str | Path | None) -> dict[str, Any]:
    """The special-token ids a folder's config.json names (the byte tokenizer's without a folder)."""
    if folder is None:
        return dict(BYTE_TOKEN_IDS)
    raw = read_json(Path(folder) / CONFIG_NAME, "Hugging Face model config")
    return {k: raw.get(k) for k in BYTE_TOKEN_IDS}


def _read_safetensors(files: Mapping[Path, list[str] | None]) -> dict[str, torch.Tensor]:
    """Tensors from each file: the listed keys (None: all of them)."""
    out: dict[str, torch.Tensor] = {}
    for path, keys in files.items():
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} is missing (listed in {INDEX_NAME})")
        with safe_open(str(path), framework="pt") as fh:
            for key in keys if keys is not None else fh.keys():
                out[key] = fh.get_tensor(key)
    return out


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF folder's safetensors weights, single file or sharded."""
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if single.is_file():
        return _read_safetensors({single: None})
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map' object mapping tensor names to files")
        files: dict[Path, list[str]] = {}
        for key, file in weight_map.items():
            files.setdefault(folder / file, []).append(key)
        return _read_safetensors(files)
    pickled = sorted(p.name for p in folder.glob("*.bin"))
    hint = f"; found {pickled}, but pickle checkpoints are not loaded (re-save with safe_serialization=True)"
    raise FileNotFoundError(f"{folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}{hint if pickled else ''}")


def _differences(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]):
    """(missing names, unexpected names, first (name, shape held, shape expected) that differs or None)."""
    missing = [n for n in expected if n not in state]
    unexpected = sorted(set(state) - set(expected))
    wrong = next(((n, tuple(state[n].shape), shape) for n, shape in expected.items()
                  if n in state and tuple(state[n].shape) != shape), None)
    return missing, unexpected, wrong


def check_state(state: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> None:
    """Exactly our model's tensors with our shapes, or a ValueError naming what differs."""
    missing, unexpected, wrong = _differences(state, {s.name: s.shape for s in tensor_specs(cfg)})
    if missing or unexpected:
        raise ValueError(f"{where}: tensors do not match a Llama model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} ({len(missing)} missing, {len(unexpected)} unexpected)")
    if wrong:
        name, got, shape = wrong
        raise ValueError(f"{where}: tensor {name} has shape {got}, the config implies {shape}")


def load_hf_model(folder: str | Path, dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(our ModelConfig, full state dict by our names) from a local HF folder; ``dtype`` casts."""
    folder = Path(folder)
    cfg = model_config_of(folder)
    state = {k: v for k, v in read_weights(folder).items() if not k.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_embeddings and "lm_head.weight" in state:
        head = state.pop("lm_head.weight")
        if not torch.equal(head, state.get("model.embed_tokens.weight", head)):
            raise ValueError(f"{folder}: tie_word_embeddings is true but lm_head.weight differs from "
                             "model.embed_tokens.weight; set tie_word_embeddings to false in config.json")
    check_state(state, cfg, str(folder))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return cfg, state


def save_hf_model(folder: str | Path, model_cfg: ModelConfig, state_dict: dict[str, torch.Tensor],
                  token_ids: dict[str, Any] | None = None) -> Path:
    """Write ``state_dict`` (full tensors, our names) as a HF folder of ``model_cfg.family``; ``token_ids``:
    the special-token ids for config.json (default: the byte tokenizer's; for a model that came from a
    folder, pass ``token_ids_of(that folder)``). Returns the folder."""
    folder = Path(folder)
    check_state(state_dict, model_cfg, "save_hf_model")
    dtypes = {t.dtype for t in state_dict.values()}
    if len(dtypes) != 1:
        raise ValueError(f"save_hf_model: tensors have mixed dtypes {sorted(map(str, dtypes))}; cast them to one")
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors refuses views sharing storage: give each tensor its own contiguous CPU copy.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    config = hf_config_dict(model_cfg, dtypes.pop(), token_ids or BYTE_TOKEN_IDS)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def check_adapter_state(adapter_state: dict[str, torch.Tensor], model_cfg: ModelConfig, lora_cfg: LoraConfig,
                        where: str) -> None:
    """Exactly the adapters ``lora_cfg`` puts on ``model_cfg``, with their shapes, or a clear ValueError."""
    expected = {s.name: s.shape for s in lora_tensor_specs(model_cfg, lora_cfg)}
    missing, unexpected, wrong = _differences(adapter_state, expected)
    if missing or unexpected:
        raise ValueError(f"{where}: adapter tensors do not match targets {list(lora_cfg.targets)} with r={lora_cfg.r}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    if wrong:
        name, got, shape = wrong
        raise ValueError(
            f"{where}: adapter tensor {name} has shape {got} but the base model needs {shape}; "
            "the adapter was trained for a different base model shape or rank"
        )


def export_merged(folder: str | Path, model_cfg: ModelConfig, base_state: dict[str, torch.Tensor],
                  adapter_state: dict[str, torch.Tensor], lora_cfg: LoraConfig,
                  token_ids: dict[str, Any] | None = None) -> Path:
    """Write base + adapters folded together (W + scaling * B @ A) as a plain HF folder of the base's family."""
    check_state(base_state, model_cfg, "export_merged base")
    check_adapter_state(adapter_state, model_cfg, lora_cfg, "export_merged")
    return save_hf_model(folder, model_cfg, merge_state_dict(base_state, adapter_state, lora_cfg), token_ids)


class BoxReader:
    """Reads slices of a HF folder's tensors without loading whole files (safetensors slicing).

    Each rank reads only the box it holds, so starting a sharded run from a large base model
    does not need the full model in any one process.
    """

    def __init__(self, folder: str | Path, cfg: ModelConfig) -> None:
        self.folder = Path(folder)
        theirs = model_config_of(self.folder)
        if theirs != cfg:
            diff = {k: (getattr(theirs, k), getattr(cfg, k)) for k in theirs.__dataclass_fields__
                    if getattr(theirs, k) != getattr(cfg, k)}
            raise ValueError(f"{self.folder} holds another model shape than this run's model config "
                             f"(folder vs config: {diff}); set the model config from the folder")
        single, index = self.folder / WEIGHTS_NAME, self.folder / INDEX_NAME
        if single.is_file():
            with safe_open(str(single), framework="pt") as fh:
                self.where = {key: single for key in fh.keys()}
        elif index.is_file():
            self.where = {k: self.folder / f for k, f in read_json(index, "safetensors index")["weight_map"].items()}
        else:
            raise FileNotFoundError(f"{self.folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")

    def read(self, name: str, box: tuple[tuple[int, int], ...], dtype: torch.dtype) -> torch.Tensor:
        if name not in self.where:
            raise ValueError(f"{self.folder} has no tensor {name}")
        with safe_open(str(self.where[name]), framework="pt") as fh:
            return fh.get_slice(name)[slices(box)].to(dtype).contiguous()
