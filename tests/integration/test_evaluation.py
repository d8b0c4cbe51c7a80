"""Evaluation during training (``train.eval_every``) on real workers: an ``eval_loss`` every K steps in
``metrics.jsonl``, equal to one plain-torch forward of every held-out row through the single-process reference's
weights at that step (float64, 1e-9), under fsdp x tp and then under a pipeline; and training untouched: the same
final weights as the reference run (which never evaluates), and every training sample used exactly once."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from elastic.control.controller import Controller
from elastic.control.events import Relayout
from elastic.control.run import with_control
from elastic.control.sources import ScriptedEvents
from elastic.core.data import build_dataset
from elastic.core.layout import Layout
from elastic.tools.metrics import read_run
from tests import helpers
from tests.helpers import tiny_config, worst_state_err
from tests.reference import build_model, train_reference

STEPS, EVERY, HELD_OUT = 4, 2, 33  # 33 rows: uneven shares, so one slice pads its last forward
FIRST, THEN = "fsdp=2,tp=2", "dp=2,pp=2,mb=2"


def reference_eval_loss(cfg, steps: int) -> float:
    """Mean token NLL over every held-out row, one plain forward of the reference's weights after ``steps``."""
    model = build_model(cfg)
    model.load_state_dict({k: v for k, v in train_reference(cfg, steps=steps).tensors.items() if "::" not in k})
    ds = build_dataset(cfg.data, cfg.train.seed)
    x, y = ds.batch(range(ds.holdout_size()), "holdout")
    with torch.no_grad():
        logits = model(x)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100, reduction="sum")
    return float(total / (y != -100).sum())


@pytest.mark.timeout(300)
def test_eval_loss_every_k_steps_equals_single_process_and_leaves_training_alone(pool, tmp_path):
    cfg = tiny_config(steps=STEPS)
    windows = len(build_dataset(dataclasses.replace(cfg.data, eval_fraction=0.0), cfg.train.seed))
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, eval_fraction=(HELD_OUT + 0.5) / windows),
                      train=dataclasses.replace(cfg.train, eval_every=EVERY))
    assert build_dataset(cfg.data, cfg.train.seed).holdout_size() == HELD_OUT
    # The evaluation after step 2 runs on FIRST; the relayout comes between steps 2 and 3, so the one after step 4
    # runs on THEN (hidden states sent stage to stage).
    script = ScriptedEvents({2: [Relayout(reason="test", layout=Layout.parse(THEN))]})
    cfg = with_control(cfg, layout=FIRST, prepare_wait_steps=0)
    controller = Controller(cfg, group=pool, sources=[script], progress=False, run_dir=str(tmp_path / "run"))
    try:
        result = controller.run()
    finally:
        controller.shutdown()
    assert [h.layout for h in result.history] == [str(Layout.parse(FIRST))] * 2 + [str(Layout.parse(THEN))] * 2
    steps, _ = read_run(tmp_path / "run")
    evals = {s["step"]: s["eval_loss"] for s in steps if "eval_loss" in s}
    assert sorted(evals) == [EVERY - 1, 2 * EVERY - 1]  # after 2 and 4 committed steps (0-based rows 1 and 3)
    assert all(s["eval_samples"] == HELD_OUT for s in steps if "eval_loss" in s)
    for step, got in evals.items():
        want = reference_eval_loss(cfg, step + 1)
        assert abs(got - want) / want <= 1e-9, f"step {step}: {got} vs {want}"
    assert evals[1] != evals[3]  # the weights moved between the two evaluations
    # Training is the reference's, which never evaluates, and every sample was trained on once.
    err, name = worst_state_err(result.tensors, train_reference(cfg).tensors)
    assert err <= 1e-9, f"{name}: {err:.2e}"
    helpers.assert_exactly_once(result.history, STEPS, cfg.train.global_batch,
                                len(build_dataset(cfg.data, cfg.train.seed)))
