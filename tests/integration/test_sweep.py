"""The learning-rate sweep: trials as Ray tasks, a table sorted by LR, the best by validation loss with the
test loss (a disjoint held-out split) reported, a plot."""

from __future__ import annotations

import dataclasses
import math

import pytest

from elastic.core.config import LoraConfig
from elastic.recipes.lora.sweep import best, log_grid, lr_sweep, plot_sweep, report
from tests.helpers import tiny_config


def test_log_grid():
    grid = log_grid(1e-5, 6e-3, 12)
    assert len(grid) == 12 and math.isclose(grid[0], 1e-5) and math.isclose(grid[-1], 6e-3)
    assert all(b / a == pytest.approx(grid[1] / grid[0]) for a, b in zip(grid, grid[1:], strict=False))
    with pytest.raises(ValueError, match="0 < low < high"):
        log_grid(1e-2, 1e-3, 5)


@pytest.mark.timeout(180)
def test_sweep_runs_trials_and_picks_the_best(ray_session, tmp_path):
    cfg = tiny_config(steps=6, dtype="float32", dataset="arithmetic").replace(lora=LoraConfig(r=4, alpha=8.0))
    # Two of the session's four CPUs per trial: one trial at a time, so one task worker runs all four in turn
    # (each new worker process costs ~7 CPU-s to import torch; the trials' results do not depend on concurrency).
    cfg = cfg.replace(runtime=dataclasses.replace(cfg.runtime, cpus_per_worker=2.0))
    results = lr_sweep(cfg, log_grid(1e-4, 3e-1, 4), eval_samples=32, progress=False)
    assert [r["lr"] for r in results] == sorted(r["lr"] for r in results) and len(results) == 4
    top = best(results)
    assert top["validation_loss"] == min(r["validation_loss"] for r in results if math.isfinite(r["validation_loss"]))
    assert results[0]["validation_loss"] > top["validation_loss"]  # 1e-4 for 6 steps barely moves the adapters
    split = top["split"]  # the trials scored two disjoint halves of the held-out problems
    assert len(split.validation) == len(split.test) == 32 and not set(split.validation) & set(split.test)
    assert all(math.isfinite(r["test_loss"]) and r["test_loss"] != r["validation_loss"] for r in results
               if math.isfinite(r["validation_loss"]))
    assert f"chosen lr {top['lr']:.2e}: test loss {top['test_loss']:.4f}" in report(results)
    png = plot_sweep(results, tmp_path / "sweep.png")
    assert png.stat().st_size > 10_000
