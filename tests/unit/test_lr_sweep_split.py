"""The learning-rate sweep selects on a validation split and reports a disjoint test split (no Ray)."""

from __future__ import annotations

import math

import pytest

from elastic.core.config import LoraConfig
from elastic.recipes.lora import sweep
from elastic.recipes.lora.sweep import best, heldout_split, report
from tests.helpers import tiny_config


@pytest.mark.parametrize(("holdout", "eval_samples"), [(2, 1), (7, 100), (512, 256), (512, 32), (1000, 600)])
def test_validation_and_test_are_disjoint_by_construction(holdout, eval_samples):
    split = heldout_split(holdout, eval_samples)
    val, test = set(split.validation), set(split.test)
    assert val and test and not val & test
    assert val | test <= set(range(holdout))
    assert len(split.validation) == min(holdout // 2, eval_samples)
    assert len(split.test) == min(holdout - holdout // 2, eval_samples)
    assert max(val) < min(test)  # validation from the first half, test from the second


def test_a_split_needs_two_heldout_samples():
    with pytest.raises(ValueError, match="at least 2 held-out samples"):
        heldout_split(1, 10)


def results_where_validation_and_test_disagree() -> list[dict]:
    """Validation prefers 1e-3, test prefers 1e-2: the test split must not move the choice."""
    return [{"lr": lr, "validation_loss": v, "test_loss": t, "train_loss": 1.0, "seconds": 1.0}
            for lr, v, t in [(1e-4, 2.0, 2.1), (1e-3, 1.0, 1.5), (1e-2, 1.2, 0.5), (1e-1, math.nan, math.nan)]]


def test_best_selects_on_validation_only():
    results = results_where_validation_and_test_disagree()
    assert best(results)["lr"] == 1e-3
    for r in results:  # any test losses at all: the same choice
        r["test_loss"] = -r["lr"]
    assert best(results)["lr"] == 1e-3
    text = report(results)
    assert "chosen on validation loss, test loss reported" in text
    assert "validation (selects)" in text and "test (reported)" in text


def test_the_sweep_scores_trials_on_both_halves(monkeypatch):
    cfg = tiny_config(steps=1, dataset="arithmetic").replace(lora=LoraConfig(r=2))
    seen = {}

    def fake_trials(cfgs, evals, progress, desc, postfix):
        seen["evals"] = evals
        return [{"lr": c.optim.lr, "validation_loss": 1.0, "test_loss": 1.0, "train_loss": 1.0, "seconds": 0.0}
                for c in cfgs]

    monkeypatch.setattr(sweep, "run_trials", fake_trials)
    results = sweep.lr_sweep(cfg, [1e-3, 1e-2], eval_samples=64, progress=False)
    evals = seen["evals"]
    assert set(evals) == {"validation", "test"} and not set(evals["validation"]) & set(evals["test"])
    assert len(evals["validation"]) == len(evals["test"]) == 64
    assert all(r["split"].validation == tuple(evals["validation"]) for r in results)
