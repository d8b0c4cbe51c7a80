"""The named tensors a run trains, with global shapes (DESIGN.md, "Training state").

Parameters come from the model (with LoRA: the frozen base plus the adapters); every trainable
parameter adds its AdamW moments under ``<name>::exp_avg`` and ``<name>::exp_avg_sq``, sharded
exactly like the parameter. Frozen base weights move as parameters with no optimizer state.
Together with the step number (which is also the data cursor and the LR-schedule position) these
tensors are everything a reshard, a recovery or a checkpoint moves. No distributed code.
"""

from __future__ import annotations

import torch

from elastic.core.boxes import Box
from elastic.core.config import Config
from elastic.core.layout import Placement, TensorSpec
from elastic.model.llama import tensor_specs
from elastic.model.lora import lora_model_specs

OPT_KEYS = ("exp_avg", "exp_avg_sq")
EMBED = "model.embed_tokens.weight"
DTYPE = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def itemsize(cfg: Config) -> int:
    """Bytes per element of the run's training tensors (``train.dtype``)."""
    return DTYPE[cfg.train.dtype].itemsize


def stored_in_bf16(cfg: Config, spec: TensorSpec) -> bool:
    """Whether the engine stores ``spec`` in bf16 rather than ``train.dtype``: under ``train.mixed_precision =
    "bf16"`` (float32 state), a frozen matmul weight (LoRA's base linears, an untied frozen LM head; 2-D and not
    the embedding, whose lookup autocast does not cast, tied or not). Exact: autocast casts that weight to bf16
    before every matmul anyway, so storing the same rounding changes no computed value (docs/design.md, item
    40). Biases, norms, the embedding and everything trainable stay at ``train.dtype``. ``train.frozen_bf16 =
    false`` keeps them there too (the comparison run of the tests)."""
    train = cfg.train
    return (train.mixed_precision == "bf16" and train.frozen_bf16 and not spec.trainable
            and len(spec.shape) == 2 and spec.name != EMBED)


def storage_itemsize(cfg: Config, spec: TensorSpec) -> int:
    """Bytes per element the engine stores ``spec`` at (``stored_in_bf16``: 2; else ``train.dtype``'s)."""
    return 2 if stored_in_bf16(cfg, spec) else itemsize(cfg)


def param_specs(cfg: Config) -> list[TensorSpec]:
    """The model's parameters; with LoRA, the frozen base followed by each layer's adapters."""
    if cfg.lora is not None:
        return lora_model_specs(cfg.model, cfg.lora)
    return tensor_specs(cfg.model)


def training_specs(cfg: Config) -> list[TensorSpec]:
    """Every tensor of the training state: the parameters, then the AdamW moments of the trainable ones."""
    params = param_specs(cfg)
    return params + [p.renamed(f"{p.name}::{key}") for p in params if p.trainable for key in OPT_KEYS]


def rank_boxes(cfg: Config, placement: Placement | None, worker: int) -> dict[str, Box]:
    """tensor name -> the box ``worker`` holds in ``placement`` ({} when it holds no rank there)."""
    rank = placement.rank_of(worker) if placement is not None else None
    if rank is None:
        return {}
    n = cfg.model.n_layers
    return {s.name: b for s in training_specs(cfg) if (b := placement.box(s, rank, n)) is not None}
