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


GROUP_BYTES = 64 * 2**20  # parameters per foreach group, at most (a larger tensor is a group of its own)


def build_adamw(named_params: list[tuple[str, torch.Tensor]], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over (name, tensor) pairs; norm weights and other 1-D tensors get no weight decay.

    The parameters are cut into groups of at most ``GROUP_BYTES``: a foreach step allocates temporaries the size
    of its whole group (``sqrt`` of the second moments, the update), which over one group of every parameter
    raised a worker's peak by the size of its share (``bench/memory.py``, full fine-tuning). AdamW is
    elementwise, so the grouping changes no value."""
    groups: dict[bool, list[list[torch.Tensor]]] = {True: [[]], False: [[]]}
    for name, param in named_params:
        buckets = groups[param.ndim >= 2 and not name.endswith("norm.weight")]
        if buckets[-1] and sum(p.nbytes for p in buckets[-1]) + param.nbytes > GROUP_BYTES:
            buckets.append([])
        buckets[-1].append(param)
    param_groups = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0}
                    for decay, buckets in groups.items() for ps in buckets if ps]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)
