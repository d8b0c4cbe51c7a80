"""Learning-rate sweeps: a log-spaced grid of short trials spread over the cluster, the best chosen on a
validation split and reported on a disjoint test split.

Plain LoRA with a well-tuned learning rate matches the fancier variants (arXiv:2602.04998), so the
sweep is a first-class, cheap operation: every trial is a Ray task (one single-process engine,
fractional CPUs; ``driver/trials.py``), Ray runs as many at once as the cluster holds, and the table
and a PNG plot of the losses against learning rate come out at the end.

The dataset's held-out samples, the run's eval set (every row of ``data.eval_data`` when given, else the
``data.eval_fraction`` held out of the data), are cut in two (``heldout_split``): the first half is the
*validation* split, on which ``best`` picks the learning rate, and the second half the *test* split, whose
loss is reported and never looked at by the selection. Both are eval losses as evaluation during training
computes them (``Engine.eval_loss``: mean token NLL, training's normalisation). A loss on the data that
picked the winner is biased low (the best of several noisy estimates), so the test loss is the honest
estimate of the chosen rate.
Assumes the held-out indices ``0 .. holdout_size - 1`` are interchangeable samples (true of every
built-in dataset and of data files' held-out rows).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from elastic.core.config import Config
from elastic.core.data import build_dataset
from elastic.driver.trials import run_trials

SELECT_ON = "validation_loss"  # the one key ``best`` reads
REPORTED = "test_loss"


@dataclass(frozen=True)
class HeldoutSplit:
    """Held-out sample indices: ``validation`` selects the learning rate, ``test`` is reported."""

    validation: tuple[int, ...]
    test: tuple[int, ...]


def heldout_split(holdout_size: int, eval_samples: int) -> HeldoutSplit:
    """Up to ``eval_samples`` indices from each half of ``range(holdout_size)``: validation from the first
    half, test from the second, so the two are disjoint by construction."""
    half = holdout_size // 2
    if half < 1 or eval_samples < 1:
        raise ValueError(f"a learning-rate sweep needs at least 2 held-out samples to split into validation and "
                         f"test, and eval_samples >= 1 (got {holdout_size} held-out, eval_samples={eval_samples}); "
                         "raise data.eval_fraction, give data.eval_data FILE, or use a bigger dataset")
    return HeldoutSplit(tuple(range(min(half, eval_samples))),
                        tuple(range(half, half + min(holdout_size - half, eval_samples))))


def log_grid(low: float, high: float, count: int) -> list[float]:
    if not (0 < low < high) or count < 2:
        raise ValueError(f"learning-rate grid needs 0 < low < high and count >= 2 (got {low}, {high}, {count})")
    step = (math.log(high) - math.log(low)) / (count - 1)
    return [math.exp(math.log(low) + i * step) for i in range(count)]


def lr_sweep(cfg: Config, lrs: list[float], eval_samples: int = 256, progress: bool = True) -> list[dict]:
    """Run one short trial per learning rate (``cfg.train.steps`` steps each); results sorted by LR.

    Each result has ``validation_loss`` (selects) and ``test_loss`` (reported), on ``heldout_split``'s
    halves of ``eval_samples`` samples each at most, and the split itself under ``split``.
    """
    split = heldout_split(build_dataset(cfg.data, cfg.train.seed).holdout_size(), eval_samples)
    cfgs = [cfg.replace(optim=dataclasses.replace(cfg.optim, lr=lr)) for lr in lrs]
    results = run_trials(cfgs, {"validation": split.validation, "test": split.test}, progress, desc="lr sweep",
                         postfix=lambda r: {"lr": f"{r['lr']:.1e}", "validation": f"{r['validation_loss']:.3f}"})
    for r in results:
        r["split"] = split
    return sorted(results, key=lambda r: r["lr"])


def best(results: list[dict]) -> dict:
    """The trial with the lowest validation loss (the test loss plays no part)."""
    finite = [r for r in results if math.isfinite(r[SELECT_ON])]
    if not finite:
        raise ValueError("every trial diverged; lower the learning-rate range")
    return min(finite, key=lambda r: r[SELECT_ON])


def report(results: list[dict]) -> str:
    """The sweep's table, saying which loss selected and which is reported."""
    top = best(results)
    split = results[0].get("split")
    sizes = f" ({len(split.validation)} validation / {len(split.test)} test samples, disjoint)" if split else ""
    lines = [f"learning-rate sweep{sizes}: chosen on validation loss, test loss reported",
             f"  {'lr':>9}  {'validation (selects)':>20}  {'test (reported)':>15}  {'seconds':>7}"]
    for r in results:
        mark = "  <- best" if r is top else ""
        lines.append(f"  {r['lr']:9.2e}  {r['validation_loss']:20.4f}  {r['test_loss']:15.4f}  "
                     f"{r['seconds']:7.0f}{mark}")
    lines.append(f"chosen lr {top['lr']:.2e}: test loss {top['test_loss']:.4f} "
                 f"(validation {top['validation_loss']:.4f}, which chose it)")
    return "\n".join(lines)


def plot_sweep(results: list[dict], out: str | Path, title: str = "learning-rate sweep") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = best(results)
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["lr"] for r in results]
    ax.plot(xs, [r["validation_loss"] for r in results], "o-", label="validation loss (selects)")
    ax.plot(xs, [r["test_loss"] for r in results], "^-", label="test loss (reported)")
    ax.plot(xs, [r["train_loss"] for r in results], "s--", alpha=0.6, label="last training loss")
    ax.axvline(top["lr"], color="tab:green", ls=":", label=f"chosen lr {top['lr']:.1e} (on validation)")
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
