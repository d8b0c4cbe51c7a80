"""Learning-rate sweeps: a log-spaced grid of short trials spread over the cluster, best by held-out loss.

Plain LoRA with a well-tuned learning rate matches the fancier variants (arXiv:2602.04998), so the
sweep is a first-class, cheap operation: every trial is a Ray task (one single-process engine,
fractional CPUs), Ray runs as many at once as the cluster holds, and the table and a PNG plot of
held-out loss against learning rate come out at the end.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import ray
from tqdm import tqdm

from elastic.core.config import Config


def log_grid(low: float, high: float, count: int) -> list[float]:
    if not (0 < low < high) or count < 2:
        raise ValueError(f"learning-rate grid needs 0 < low < high and count >= 2 (got {low}, {high}, {count})")
    step = (math.log(high) - math.log(low)) / (count - 1)
    return [math.exp(math.log(low) + i * step) for i in range(count)]


@ray.remote(max_retries=0)
def _trial(cfg: Config, eval_samples: int) -> dict:
    import torch

    from elastic.core.layout import Layout, Placement
    from elastic.runtime.engine import Engine

    torch.set_num_threads(cfg.runtime.threads_per_worker)
    started = time.perf_counter()
    engine = Engine(cfg, Placement(Layout(), (0,)), 0)
    losses = [engine.train_step().loss for _ in range(cfg.train.steps)]
    n = min(eval_samples, engine.dataset.holdout_size())
    total, tokens = engine.eval_loss(list(range(n)), "holdout")
    return {"lr": cfg.optim.lr, "train_loss": losses[-1], "heldout_loss": total / max(tokens, 1),
            "diverged": not math.isfinite(losses[-1]), "seconds": time.perf_counter() - started}


def lr_sweep(cfg: Config, lrs: list[float], eval_samples: int = 256, progress: bool = True) -> list[dict]:
    """Run one short trial per learning rate (``cfg.train.steps`` steps each); results sorted by LR."""
    refs = [_trial.options(num_cpus=cfg.runtime.cpus_per_worker).remote(
        cfg.replace(optim=dataclasses.replace(cfg.optim, lr=lr)), eval_samples) for lr in lrs]
    results, pending = [], list(refs)
    with tqdm(total=len(refs), desc="lr sweep", unit="trial", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results.append(ray.get(done[0]))
            bar.set_postfix(lr=f"{results[-1]['lr']:.1e}", heldout=f"{results[-1]['heldout_loss']:.3f}")
            bar.update(1)
    return sorted(results, key=lambda r: r["lr"])


def best(results: list[dict]) -> dict:
    finite = [r for r in results if math.isfinite(r["heldout_loss"])]
    if not finite:
        raise ValueError("every trial diverged; lower the learning-rate range")
    return min(finite, key=lambda r: r["heldout_loss"])


def plot_sweep(results: list[dict], out: str | Path, title: str = "learning-rate sweep") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = best(results)
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["lr"] for r in results]
    ax.plot(xs, [r["heldout_loss"] for r in results], "o-", label="held-out loss")
    ax.plot(xs, [r["train_loss"] for r in results], "s--", alpha=0.6, label="last training loss")
    ax.axvline(top["lr"], color="tab:green", ls=":", label=f"best lr {top['lr']:.1e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
