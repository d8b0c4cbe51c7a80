"""One short trial in this process: a single-process engine trains ``cfg.train.steps`` steps, then
scores the loss on named sets of held-out samples. The body of a learning-rate sweep's trial
(``recipes/lora/sweep.py``, which names a validation and a test set), run as a Ray task by
``driver/trials.py``. No process group: world 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import torch

from elastic.core.config import Config
from elastic.core.layout import Layout, Placement
from elastic.runtime.engine import Engine


def train_and_evaluate(cfg: Config, evals: Mapping[str, Sequence[int]]) -> dict:
    """{"lr", "train_loss", "<name>_loss" for each held-out index set of ``evals``, "diverged", "seconds"}."""
    torch.set_num_threads(cfg.runtime.threads_per_worker)
    started = time.perf_counter()
    engine = Engine(cfg, Placement(Layout(), (0,)), 0)
    losses = [engine.train_step().loss for _ in range(cfg.train.steps)]
    out = {"lr": cfg.optim.lr, "train_loss": losses[-1], "diverged": not math.isfinite(losses[-1])}
    for name, indices in evals.items():
        total, tokens = engine.eval_loss(list(indices), "holdout")
        out[f"{name}_loss"] = total / max(tokens, 1)
    out["seconds"] = time.perf_counter() - started
    return out
