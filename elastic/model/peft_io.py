"""LoRA adapters in PEFT's on-disk format: ``adapter_config.json`` + ``adapter_model.safetensors``.

A folder written by ``save_peft_adapter`` loads with
``PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), folder)``, and
``load_peft_adapter`` reads folders PEFT wrote for a Llama base. PEFT stores each tensor as
``base_model.model.<our name>`` (no adapter name), e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, so the mapping is a prefix.

The config carries every key PEFT 0.21's ``LoraConfig`` writes, with PEFT's defaults for the
features we do not use, except ``peft_version`` (PEFT fills in its own on load; we are not PEFT).
Older PEFT versions drop keys they do not know with a warning. On import, adapters that use
features our ``LoRALinear`` does not compute (DoRA, biases, per-module rank or alpha patterns,
layer subsets, regex targets, extra trained modules, aLoRA's invocation tokens, routed or
compressed variants) are refused with a clear error rather than loaded wrongly, and every tensor's
shape is checked against the base model config.

Only safetensors are read or written (no pickle). No distributed code here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from elastic.core.config import ModelConfig
from elastic.model.hf import check_adapter_state, read_json
from elastic.model.lora import LoraConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def peft_adapter_config(lora_cfg: LoraConfig, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """``adapter_config.json`` content for ``lora_cfg``, key for key as PEFT 0.21 writes it."""
    alpha = int(lora_cfg.alpha) if float(lora_cfg.alpha).is_integer() else lora_cfg.alpha
    return {
        "alora_invocation_tokens": None,
        "alpha_pattern": {},
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": lora_cfg.dropout,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "qalora_group_size": 16,
        "r": lora_cfg.r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": list(lora_cfg.targets),
        "target_parameters": None,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": lora_cfg.use_rslora,
        "velora_config": None,
    }


def save_peft_adapter(folder: str | Path, model_cfg: ModelConfig, lora_cfg: LoraConfig,
                      adapter_state: dict[str, torch.Tensor], base_model_name_or_path: str | None = None) -> Path:
    """Write adapters (full tensors, our names) as a PEFT LoRA folder. Returns the folder."""
    folder = Path(folder)
    check_adapter_state(adapter_state, model_cfg, lora_cfg, "save_peft_adapter")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {PREFIX + k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state.items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = peft_adapter_config(lora_cfg, base_model_name_or_path)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


# adapter_config.json keys whose non-default values change what the adapter computes.
_MUST_BE = {
    "use_dora": (False, "DoRA adapters are not supported"),
    "bias": ("none", "trained biases are not supported"),
    "lora_bias": (False, "LoRA biases are not supported"),
    "fan_in_fan_out": (False, "fan-in/fan-out (Conv1D) weights are not supported"),
    "use_qalora": (False, "QA-LoRA is not supported"),
}
_MUST_BE_EMPTY = {
    "rank_pattern": "per-module ranks are not supported",
    "alpha_pattern": "per-module alphas are not supported",
    "layers_to_transform": "adapters on a subset of layers are not supported",
    "layer_replication": "layer replication is not supported",
    "modules_to_save": "fully trained extra modules are not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "target_parameters": "adapters on raw parameters are not supported",
    "exclude_modules": "excluded modules are not supported",
    "alora_invocation_tokens": "an aLoRA adapter applies only after its invocation tokens, and our LoRA applies "
                               "everywhere",
    "arrow_config": "Arrow routing among several adapters is not supported",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "megatron_config": "Megatron-parallel LoRA layers are not supported",
    "velora_config": "VeLoRA's compressed activations are not supported",
    "monteclora_config": "MonteCLoRA's sampled adapters are not supported",
    "kasa_config": "KaSA adapters are not supported",
    "astra_config": "Astra adapter layers are not supported",  # PEFT 0.22
}
# Keys of PEFT's LoraConfig that do not change what a loaded adapter computes: bookkeeping, the
# initialisation recipe (the saved tensors are what counts), and options that only apply with a
# feature refused above. ``tests/unit/test_hf_peft.py`` checks that every key of the installed PEFT's
# LoraConfig is in one of the three tables, so a new PEFT feature cannot load silently.
_HARMLESS = (
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "layers_pattern", "megatron_core",
    "qalora_group_size", "runtime_config", "ensure_weight_tying",
)


def lora_config_from_peft(raw: dict[str, Any], where: str) -> LoraConfig:
    """Our LoraConfig from a PEFT adapter_config.json dict, refusing features we do not compute."""
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type={raw.get('peft_type')!r}; only LORA adapters can be loaded")
    for key, (expected, why) in _MUST_BE.items():
        if raw.get(key, expected) != expected:
            raise ValueError(f"{where}: {key}={raw[key]!r}: {why} (expected {expected!r})")
    for key, why in _MUST_BE_EMPTY.items():
        if raw.get(key):
            raise ValueError(f"{where}: {key}={raw[key]!r}: {why}")
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{where}: task_type={raw['task_type']!r}; only CAUSAL_LM adapters fit a Llama decoder")
    targets = raw.get("target_modules")
    if not isinstance(targets, list):
        raise ValueError(
            f"{where}: target_modules={targets!r}; only an explicit list of module names is supported "
            "(not a regex or 'all-linear'), e.g. ['q_proj', 'v_proj']"
        )
    try:
        return LoraConfig(r=raw.get("r", 8), alpha=raw.get("lora_alpha", 8), dropout=raw.get("lora_dropout", 0.0),
                          targets=tuple(targets), use_rslora=bool(raw.get("use_rslora", False)))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def load_peft_adapter(folder: str | Path, model_cfg: ModelConfig) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(LoraConfig, adapter tensors by our names) from a PEFT LoRA folder, checked against ``model_cfg``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"PEFT adapter folder {folder} does not exist")
    config_path = folder / ADAPTER_CONFIG
    lora_cfg = lora_config_from_peft(read_json(config_path, "PEFT adapter config"), str(config_path))
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        hint = " (adapter_model.bin is there, but pickle files are not loaded: re-save with safetensors)"
        raise FileNotFoundError(f"{weights} does not exist{hint if pickled else ''}")
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(weights), framework="pt") as fh:
        for key in fh.keys():
            if not key.startswith(PREFIX):
                raise ValueError(f"{weights}: tensor {key!r} lacks PEFT's {PREFIX!r} prefix")
            state[key.removeprefix(PREFIX)] = fh.get_tensor(key)
    check_adapter_state(state, model_cfg, lora_cfg, str(weights))
    return lora_cfg, state
