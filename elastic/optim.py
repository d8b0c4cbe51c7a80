"""AdamW parameter groups and the warmup + cosine learning-rate schedule.

The schedule is a pure function of the step, so the step number is its whole state.
Parameter groups are split by sharding signature as well as by weight decay: torch's foreach
kernels need every tensor in a group to be of one kind (plain tensor, or DTensor on one mesh).
"""

from __future__ import annotations

import math

import torch

from elastic.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _signature(param: torch.Tensor) -> str:
    mesh = getattr(param, "device_mesh", None)
    placements = getattr(param, "placements", None)
    return f"{type(param).__name__}:{mesh}:{placements}"


def build_adamw(named_params: list[tuple[str, torch.Tensor]], cfg: OptimConfig) -> torch.optim.AdamW:
    groups: dict[tuple[bool, str], list[torch.Tensor]] = {}
    for name, param in named_params:
        decay = param.ndim >= 2 and not name.endswith("norm.weight")
        groups.setdefault((decay, _signature(param)), []).append(param)
    param_groups = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0}
                    for (decay, _), ps in groups.items()]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
