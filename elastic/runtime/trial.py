"""One short trial in this process: a single-process engine trains ``cfg.train.steps`` steps, then
scores held-out loss. The body of a learning-rate sweep's trial (``recipes/lora/sweep.py``), run as a
Ray task by ``driver/trials.py``. No process group: world 1.
"""

from __future__ import annotations

import math
import time

import torch

from elastic.core.config import Config
from elastic.core.layout import Layout, Placement
from elastic.runtime.engine import Engine


def train_and_evaluate(cfg: Config, eval_samples: int) -> dict:
    """{"lr", "train_loss", "heldout_loss", "diverged", "seconds"} of one trial."""
    torch.set_num_threads(cfg.runtime.threads_per_worker)
    started = time.perf_counter()
    engine = Engine(cfg, Placement(Layout(), (0,)), 0)
    losses = [engine.train_step().loss for _ in range(cfg.train.steps)]
    n = min(eval_samples, engine.dataset.holdout_size())
    total, tokens = engine.eval_loss(list(range(n)), "holdout")
    return {"lr": cfg.optim.lr, "train_loss": losses[-1], "heldout_loss": total / max(tokens, 1),
            "diverged": not math.isfinite(losses[-1]), "seconds": time.perf_counter() - started}
