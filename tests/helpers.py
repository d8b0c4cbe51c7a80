"""Helpers shared by tests: small configs, the single-process reference run, error measures."""

from __future__ import annotations

import torch

from elastic.core.config import (
    MODEL_PRESETS,
    Config,
    DataConfig,
    OptimConfig,
    RuntimeConfig,
    TrainConfig,
)
from elastic.core.layout import Layout, Placement
from elastic.runtime.engine import Engine


def tiny_config(dtype: str = "float64", steps: int = 10, global_batch: int = 8, seq_len: int = 16,
                dataset: str = "stdlib", **model_overrides) -> Config:
    model = MODEL_PRESETS["tiny"]
    if model_overrides:
        import dataclasses

        model = dataclasses.replace(model, **model_overrides)
    return Config(
        model=model,
        data=DataConfig(dataset=dataset, seq_len=seq_len, max_corpus_bytes=200_000, num_samples=2000),
        train=TrainConfig(steps=steps, global_batch=global_batch, dtype=dtype, seed=1234),
        # A high LR and a clip that binds make the runs sensitive to any mistake.
        optim=OptimConfig(lr=1e-2, warmup_steps=2, grad_clip=1.0),
        runtime=RuntimeConfig(workers=4, collective_timeout_s=60, store_timeout_s=60),
    )


def reference_run(cfg: Config, steps: int | None = None) -> tuple[list[float], dict[str, torch.Tensor], Engine]:
    """The uninterrupted single-process run: losses and the full final state."""
    engine = Engine(cfg, Placement(Layout(), (0,)), 0)
    losses = [engine.train_step().loss for _ in range(cfg.train.steps if steps is None else steps)]
    return losses, {k: v.clone() for k, v in engine.local_state().items()}, engine


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 for empty tensors)."""
    if b.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


def worst_state_err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert set(got) == set(ref), f"state keys differ: {set(got) ^ set(ref)}"
    errs = {k: rel_err(got[k], ref[k]) for k in ref}
    name = max(errs, key=errs.get)
    return errs[name], name


def digit_reward(prompt: str, completion: str) -> float:
    """A graded reward with spread even for an untrained model (the share of byte-tokens that are
    ASCII printable), so GRPO advantages are non-zero in tests."""
    return sum(32 <= ord(c) < 127 for c in completion) / max(len(completion), 1)
