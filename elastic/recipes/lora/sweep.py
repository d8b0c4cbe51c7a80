"""Learning-rate sweeps: a log-spaced grid of short trials spread over the cluster, best by held-out loss.

Plain LoRA with a well-tuned learning rate matches the fancier variants (arXiv:2602.04998), so the
sweep is a first-class, cheap operation: every trial is a Ray task (one single-process engine,
fractional CPUs; ``driver/trials.py``), Ray runs as many at once as the cluster holds, and the table
and a PNG plot of held-out loss against learning rate come out at the end.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from elastic.core.config import Config
from elastic.driver.trials import run_trials


def log_grid(low: float, high: float, count: int) -> list[float]:
    if not (0 < low < high) or count < 2:
        raise ValueError(f"learning-rate grid needs 0 < low < high and count >= 2 (got {low}, {high}, {count})")
    step = (math.log(high) - math.log(low)) / (count - 1)
    return [math.exp(math.log(low) + i * step) for i in range(count)]


def lr_sweep(cfg: Config, lrs: list[float], eval_samples: int = 256, progress: bool = True) -> list[dict]:
    """Run one short trial per learning rate (``cfg.train.steps`` steps each); results sorted by LR."""
    cfgs = [cfg.replace(optim=dataclasses.replace(cfg.optim, lr=lr)) for lr in lrs]
    results = run_trials(cfgs, eval_samples, progress, desc="lr sweep",
                         postfix=lambda r: {"lr": f"{r['lr']:.1e}", "heldout": f"{r['heldout_loss']:.3f}"})
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
