"""AdamW parameter groups and the warmup + cosine learning-rate schedule.

The schedule is a pure function of the step, so the step number is its whole state.
The optimizer runs on plain local shards (AdamW is elementwise, so the shard's update is the
slice of the full update): no DTensor dispatch on the hot path, and foreach kernels throughout.
"""

from __future__ import annotations

import math

import torch

from elastic.core.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_adamw(named_params: list[tuple[str, torch.Tensor]], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over (name, tensor) pairs; norm weights and other 1-D tensors get no weight decay."""
    groups: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    for name, param in named_params:
        groups[param.ndim >= 2 and not name.endswith("norm.weight")].append(param)
    param_groups = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0}
                    for decay, ps in groups.items() if ps]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)
