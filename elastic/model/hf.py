"""Hugging Face Llama folders in and out: ``config.json`` plus safetensors weights.

``load_hf_llama`` reads a local folder written by ``LlamaForCausalLM.save_pretrained`` (one
``model.safetensors``, or shards listed in ``model.safetensors.index.json``) and returns our
``ModelConfig`` and a state dict with our parameter names (which are HF's). It accepts only what
our decoder computes exactly: plain RoPE (no scaling), no attention or MLP biases, SiLU, and
``head_dim == hidden_size / num_attention_heads``; anything else is refused with an error that
names the folder, the field and the value, rather than loaded into a model that computes
something else.

Tied embeddings (``tie_word_embeddings: true``) are untied on load: ``lm_head.weight`` becomes a
copy of the embedding. Our training keeps the two as separate tensors (they shard and reshard
independently), so after fine-tuning they may differ; ``save_hf_llama`` therefore always writes
``tie_word_embeddings: false`` with both tensors.

``save_hf_llama`` writes a folder transformers loads (config.json + model.safetensors) and
``export_merged`` writes one with LoRA adapters folded into the base weights. Only safetensors
are read or written: pickle-based ``.bin`` checkpoints are refused. No distributed code here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from elastic.core.config import ModelConfig
from elastic.core.tokenizer import BOS, EOS, PAD
from elastic.model.llama import tensor_specs
from elastic.model.lora import LoraConfig, lora_tensor_specs, merge_state_dict

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
# Buffers some older checkpoints carry; our model recomputes them.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


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


def _rope_theta(raw: dict[str, Any], where: str) -> float:
    """RoPE base from either transformers 4.x (``rope_theta``, ``rope_scaling``) or 5.x (``rope_parameters``)."""
    theta = raw.get("rope_theta", 10000.0)
    for key in ("rope_scaling", "rope_parameters"):
        params = raw.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ValueError(f"{where}: {key}={params!r} must be an object or null")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"{where}: {key} uses rope_type={rope_type!r}; only plain RoPE is supported "
                f"(our decoder has no RoPE scaling), so this model cannot be loaded exactly"
            )
        theta = params.get("rope_theta", theta)
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{where}: {key}.partial_rotary_factor={params['partial_rotary_factor']} is unsupported")
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={raw['partial_rotary_factor']} is unsupported")
    return float(theta)


def model_config_from_hf(raw: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Our ModelConfig from a HF Llama config dict, refusing features our decoder does not compute."""
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if archs and "LlamaForCausalLM" not in archs:
        raise ValueError(
            f"{where}: architectures={archs} (model_type={model_type!r}); only LlamaForCausalLM checkpoints "
            "can be loaded"
        )
    if not archs and model_type != "llama":
        raise ValueError(f"{where}: model_type={model_type!r} and no architectures; expected a Llama model")
    unsupported = {
        "attention_bias": (False, "our attention projections have no bias"),
        "mlp_bias": (False, "our MLP projections have no bias"),
        "hidden_act": ("silu", "our MLP is SwiGLU with SiLU"),
    }
    for key, (expected, why) in unsupported.items():
        if key in raw and raw[key] != expected:
            raise ValueError(f"{where}: {key}={raw[key]!r} is unsupported ({why}); expected {expected!r}")
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if k not in raw]
    if missing:
        raise ValueError(f"{where}: missing fields {missing}; a Llama config.json has them all")
    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    head_dim = raw.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        raise ValueError(
            f"{where}: head_dim={head_dim} but hidden_size / num_attention_heads = {hidden} / {heads}; "
            "our decoder requires head_dim * num_attention_heads == hidden_size"
        )
    try:
        return ModelConfig(
            vocab_size=raw["vocab_size"],
            dim=hidden,
            n_layers=raw["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=raw.get("num_key_value_heads") or heads,
            ffn_dim=raw["intermediate_size"],
            max_seq_len=raw.get("max_position_embeddings", 2048),
            rope_theta=_rope_theta(raw, where),
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        )
    except ValueError as err:
        raise ValueError(f"{where}: this Llama shape is not supported by our decoder: {err}") from err


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for ``cfg`` as transformers writes it (readable by 4.x and 5.x)."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # 4.x reads rope_theta/rope_scaling, 5.x rope_parameters; both describe plain RoPE.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "use_cache": True,
        "torch_dtype": dtype_name,  # transformers 4.x
        "dtype": dtype_name,  # transformers 5.x
    }


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


def load_hf_llama(folder: str | Path, dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(our ModelConfig, full state dict by our names) from a local HF Llama folder; ``dtype`` casts."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Hugging Face model folder {folder} does not exist")
    raw = read_json(folder / CONFIG_NAME, "Hugging Face model config")
    cfg = model_config_from_hf(raw, str(folder / CONFIG_NAME))
    state = {k: v for k, v in read_weights(folder).items() if not k.endswith(_IGNORED_SUFFIXES)}
    if raw.get("tie_word_embeddings", False) and "model.embed_tokens.weight" in state:
        # Untie: our lm_head is its own tensor (see the module docstring).
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    check_state(state, cfg, str(folder))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return cfg, state


def save_hf_llama(folder: str | Path, model_cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write ``state_dict`` (full tensors, our names) as a HF LlamaForCausalLM folder. Returns the folder."""
    folder = Path(folder)
    check_state(state_dict, model_cfg, "save_hf_llama")
    dtypes = {t.dtype for t in state_dict.values()}
    if len(dtypes) != 1:
        raise ValueError(f"save_hf_llama: tensors have mixed dtypes {sorted(map(str, dtypes))}; cast them to one")
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors refuses views sharing storage: give each tensor its own contiguous CPU copy.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    config = hf_config_dict(model_cfg, dtypes.pop())
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
                  adapter_state: dict[str, torch.Tensor], lora_cfg: LoraConfig) -> Path:
    """Write base + adapters folded together (W + scaling * B @ A) as a plain HF Llama folder."""
    check_state(base_state, model_cfg, "export_merged base")
    check_adapter_state(adapter_state, model_cfg, lora_cfg, "export_merged")
    return save_hf_llama(folder, model_cfg, merge_state_dict(base_state, adapter_state, lora_cfg))


class BoxReader:
    """Reads slices of a HF folder's tensors without loading whole files (safetensors slicing).

    Each rank reads only the box it holds, so starting a sharded run from a large base model
    does not need the full model in any one process. Tied embeddings serve lm_head.weight.
    """

    def __init__(self, folder: str | Path, cfg: ModelConfig) -> None:
        self.folder = Path(folder)
        raw = read_json(self.folder / CONFIG_NAME, "Hugging Face model config")
        theirs = model_config_from_hf(raw, str(self.folder / CONFIG_NAME))
        if theirs != cfg:
            diff = {k: (getattr(theirs, k), getattr(cfg, k)) for k in theirs.__dataclass_fields__
                    if getattr(theirs, k) != getattr(cfg, k)}
            raise ValueError(f"{self.folder} holds another model shape than this run's model config "
                             f"(folder vs config: {diff}); set the model config from the folder")
        self.tied = bool(raw.get("tie_word_embeddings", False))
        single, index = self.folder / WEIGHTS_NAME, self.folder / INDEX_NAME
        if single.is_file():
            with safe_open(str(single), framework="pt") as fh:
                self.where = {key: single for key in fh.keys()}
        elif index.is_file():
            self.where = {k: self.folder / f for k, f in read_json(index, "safetensors index")["weight_map"].items()}
        else:
            raise FileNotFoundError(f"{self.folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")

    def read(self, name: str, box: tuple[tuple[int, int], ...], dtype: torch.dtype) -> torch.Tensor:
        key = "model.embed_tokens.weight" if name == "lm_head.weight" and self.tied else name
        if key not in self.where:
            raise ValueError(f"{self.folder} has no tensor {key}")
        with safe_open(str(self.where[key]), framework="pt") as fh:
            return fh.get_slice(key)[tuple(slice(lo, hi) for lo, hi in box)].to(dtype).contiguous()
