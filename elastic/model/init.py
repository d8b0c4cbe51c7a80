"""Deterministic, layout-independent parameter initialisation.

Each tensor is drawn from its own generator, seeded by (run seed, tensor name). Any rank can
therefore build exactly the slice of a tensor it holds, and every layout starts from the same
weights as the single-process run.
"""

from __future__ import annotations

import math

import torch

from elastic.core.boxes import Box, slices
from elastic.core.config import ModelConfig
from elastic.core.layout import TensorSpec
from elastic.core.seeds import stable_seed


def init_tensor(spec: TensorSpec, cfg: ModelConfig, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The full initial value of one parameter.

    Norm weights start at one. Other weights are normal(0, init_std); the projections that write
    into the residual stream (o_proj, down_proj) are scaled by 1/sqrt(2 * n_layers), as in GPT-2.
    """
    if spec.name.endswith("norm.weight"):
        return torch.ones(spec.shape, dtype=dtype)
    std = cfg.init_std
    if spec.name.endswith(("o_proj.weight", "down_proj.weight")):
        std /= math.sqrt(2 * cfg.n_layers)
    gen = torch.Generator().manual_seed(stable_seed(seed, "init", spec.name))
    # Draw in float32 whatever the training dtype, so float32 and float64 runs start alike.
    return (torch.randn(spec.shape, generator=gen, dtype=torch.float32) * std).to(dtype)


def init_box(spec: TensorSpec, box: Box, cfg: ModelConfig, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The part ``box`` of a parameter's initial value (contiguous)."""
    full = init_tensor(spec, cfg, seed, dtype)
    return full[slices(box)].contiguous()
