"""Hugging Face model families to and from our ``ModelConfig``: Llama, Qwen2, Qwen3 and Mistral.

``model_config_from_hf`` reads a folder's ``config.json`` through ``transformers.AutoConfig`` (local
files only), so each family's defaults are transformers' own: Qwen3's ``head_dim`` of 128 when the
file has none, the RoPE parameters of either transformers 4.x (``rope_theta``/``rope_scaling``) or
5.x (``rope_parameters``), the per-layer attention types. It accepts only what our decoder computes
exactly, and refuses anything else with the file, the field, its value and why:

- Llama: ``attention_bias`` (q/k/v/o biases), RoPE ``default`` or ``llama3``, any ``head_dim``,
  tied embeddings (SmolLM2, Llama 3.2 1B); not ``mlp_bias`` or ``pretraining_tp`` > 1.
- Qwen2/Qwen2.5: q/k/v biases (always, as transformers builds them), tied embeddings; no sliding window.
- Qwen3: per-head ``q_norm``/``k_norm``, ``head_dim`` of its own, ``attention_bias``; no sliding window.
- Mistral: no biases; a ``sliding_window`` is kept and ``Config`` refuses a run whose sequences
  would exceed it (below the window, sliding attention equals full attention).

``hf_config_dict`` writes the config.json of a ``ModelConfig`` for its family, which transformers
4.x and 5.x both read. No distributed code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from elastic.core.config import ModelConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mistral": "MistralForCausalLM"}
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def read_hf_config(folder: Path) -> Any:
    """transformers' config object of a local model folder (no hub access), or a clear error."""
    from transformers import AutoConfig

    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"Hugging Face model config: {path} does not exist")
    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, KeyError, OSError) as err:
        raise ValueError(f"{path}: transformers cannot read this config ({err})") from err


def _refuse(where: str, field: str, value: Any, why: str) -> None:
    raise ValueError(f"{where}: {field}={value!r} is unsupported: {why}")


def _rope(hf: Any, where: str) -> dict[str, Any]:
    """Our RoPE fields from transformers' standardised ``rope_parameters``."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    if not params:  # transformers 4.x
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    rope_type = params.get("rope_type", "default")
    if params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0)) != 1.0:
        _refuse(where, "partial_rotary_factor", params.get("partial_rotary_factor"),
                "our decoder rotates the whole head")
    out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", 10000.0)), "rope_type": rope_type}
    if rope_type == "llama3":
        missing = [k for k in LLAMA3_KEYS if k not in params]
        if missing:
            raise ValueError(f"{where}: rope_scaling of type 'llama3' lacks {missing}")
        out.update(rope_factor=float(params["factor"]), rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_max_len=int(params["original_max_position_embeddings"]))
    elif rope_type != "default":
        _refuse(where, "rope_scaling.rope_type", rope_type, "our decoder computes plain RoPE and Llama 3's "
                "'llama3' scaling only, so this model would compute something else")
    return out


def _no_sliding_window(hf: Any, where: str) -> None:
    if getattr(hf, "use_sliding_window", False):
        _refuse(where, "use_sliding_window", True, "our decoder attends to every earlier position")
    kinds = set(getattr(hf, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        _refuse(where, "layer_types", sorted(kinds), "only full attention layers are computed")


def model_config_from_hf(hf: Any, where: str = "config.json") -> ModelConfig:
    """Our ModelConfig from transformers' config object, refusing what our decoder does not compute."""
    family = getattr(hf, "model_type", None)
    if family not in ARCHITECTURES:
        _refuse(where, "model_type", family, f"supported families are {sorted(ARCHITECTURES)}")
    archs = list(getattr(hf, "architectures", None) or [])
    if archs and ARCHITECTURES[family] not in archs:
        _refuse(where, "architectures", archs, f"a {family} causal LM is {ARCHITECTURES[family]}")
    if getattr(hf, "hidden_act", "silu") != "silu":
        _refuse(where, "hidden_act", hf.hidden_act, "our MLP is SwiGLU with SiLU")
    if getattr(hf, "mlp_bias", False):
        _refuse(where, "mlp_bias", True, "our MLP projections have no bias")
    if getattr(hf, "pretraining_tp", 1) != 1:
        _refuse(where, "pretraining_tp", hf.pretraining_tp, "set it to 1 (it only changes summation order)")
    if getattr(hf, "attention_dropout", 0.0):
        _refuse(where, "attention_dropout", hf.attention_dropout, "training would not be deterministic")
    heads = hf.num_attention_heads
    fields: dict[str, Any] = {"family": family}
    attention_bias = bool(getattr(hf, "attention_bias", False))
    if family == "llama" or family == "qwen3":
        fields.update(qkv_bias=attention_bias, o_bias=attention_bias)
    elif family == "qwen2":
        fields.update(qkv_bias=True)  # Qwen2Attention builds q/k/v with biases whatever the config says
    elif attention_bias:
        _refuse(where, "attention_bias", True, "Mistral's attention has no biases")
    if family in ("qwen2", "qwen3"):
        _no_sliding_window(hf, where)
    if family == "mistral" and getattr(hf, "sliding_window", None):
        fields["sliding_window"] = int(hf.sliding_window)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    if head_dim * heads != hf.hidden_size or family == "qwen3":
        fields["head_size"] = int(head_dim)
    try:
        return ModelConfig(
            vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.num_hidden_layers, n_heads=heads,
            n_kv_heads=getattr(hf, "num_key_value_heads", None) or heads, ffn_dim=hf.intermediate_size,
            max_seq_len=getattr(hf, "max_position_embeddings", 2048), norm_eps=float(hf.rms_norm_eps),
            qk_norm=family == "qwen3", tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            **_rope(hf, where), **fields)
    except ValueError as err:
        raise ValueError(f"{where}: this {family} shape is not supported by our decoder: {err}") from err


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype, token_ids: dict[str, int | None]) -> dict[str, Any]:
    """config.json for ``cfg`` as transformers writes it for its family (read by 4.x and 5.x)."""
    dtype_name = str(dtype).removeprefix("torch.")
    rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type == "llama3":
        rope.update(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_len)
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # 4.x reads rope_theta/rope_scaling, 5.x rope_parameters.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope if cfg.rope_type != "default" else None,
        "rope_parameters": rope,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "torch_dtype": dtype_name,  # transformers 4.x
        "dtype": dtype_name,  # transformers 5.x
        **token_ids,
    }
    if cfg.family in ("llama", "qwen3"):
        out["attention_bias"] = cfg.qkv_bias
    if cfg.family == "llama":
        out.update(mlp_bias=False, pretraining_tp=1)
    if cfg.family in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    if cfg.family == "mistral":
        out["sliding_window"] = cfg.sliding_window or None
    return out
