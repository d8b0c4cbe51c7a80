"""Cost model and policy: pure decisions, no processes."""

from __future__ import annotations

import pytest

from elastic.core.config import MODEL_PRESETS
from elastic.core.layout import Layout, Placement
from elastic.plan.costmodel import CostModel
from elastic.plan.decisions import Move, Pause, Refuse, Stay
from elastic.plan.memory import size
from elastic.plan.policy import Policy
from tests.helpers import tiny_config


def model(cores=4.0):
    cfg = tiny_config(global_batch=16)
    return cfg, CostModel(MODEL_PRESETS["25m"], 16, 128, 4, cores=cores)


def test_cost_model_shapes():
    _, cost = model()
    assert cost.compute_seconds(Layout(dp=2)) < cost.compute_seconds(Layout())
    assert cost.compute_seconds(Layout(pp=2, microbatches=2)) > cost.compute_seconds(Layout(dp=2))
    assert cost.comm_seconds(Layout(fsdp=2)) > cost.comm_seconds(Layout(dp=2)) > cost.comm_seconds(Layout())
    # Beyond the core count extra workers add no compute.
    assert cost.compute_seconds(Layout(dp=8)) == pytest.approx(cost.compute_seconds(Layout(dp=4)))


def test_calibration_tracks_observed_steps():
    _, cost = model()
    layout = Layout(dp=2)
    for _ in range(20):
        cost.observe_step(layout, 2.0 * cost.step_seconds(layout))
    slow = cost.step_seconds(layout)
    for _ in range(40):
        cost.observe_step(layout, 1.0)
    assert cost.step_seconds(layout) == pytest.approx(1.0, rel=0.05) and slow > 1.5


def test_policy_keeps_a_good_placement_and_moves_when_it_must():
    cfg = tiny_config(global_batch=16)
    cost = CostModel(cfg.model, 16, cfg.data.seq_len, 8, cores=2)
    policy = Policy(cfg, cost)
    current = Placement(Layout(dp=2), (0, 1))
    assert isinstance(policy.decide(current, [0, 1], remaining=100), Stay)
    moved = policy.decide(current, [0], remaining=100, must_move=True, reason="drain 1")
    assert isinstance(moved, Move) and moved.placement.workers == (0,) and "drain 1" in moved.reason


def test_policy_refuses_impossible_requests_and_pauses_below_minimum():
    cfg = tiny_config(global_batch=16)
    policy = Policy(cfg, CostModel(cfg.model, 16, 16, 8), min_workers=2)
    refused = policy.decide(None, [0, 1, 2], 10, forced=Layout(tp=3))
    assert isinstance(refused, Refuse) and refused.request == Layout(tp=3)
    assert "tp=3 does not divide n_heads=4" in refused.reason
    refused = policy.decide(None, [0, 1], 10, forced=Layout(dp=4))
    assert isinstance(refused, Refuse) and "needs 4 workers but only 2 are available" in refused.reason
    decision = policy.decide(Placement(Layout(dp=2), (0, 1)), [0], 10, must_move=True)
    assert isinstance(decision, Pause) and "needs at least 2" in decision.reason


def test_rank_assignment_keeps_shards_local():
    cfg = tiny_config(global_batch=16)
    policy = Policy(cfg, CostModel(cfg.model, 16, 16, 8))
    old = Placement(Layout(fsdp=2, tp=2), (7, 3, 9, 4))
    again = policy.assign(old, Layout(fsdp=2, tp=2), [3, 4, 7, 9])
    assert again == old
    import itertools

    from elastic.plan.planner import make_plan

    def moved(layout, workers):
        return make_plan(old, Placement(layout, tuple(workers)), policy.specs, cfg.model.n_layers, 8).bytes_moved()

    # Into another layout on the same workers: the order that moves least of all 24, less than the sorted one.
    for layout in (Layout(dp=2, tp=2), Layout(tp=4)):
        smart = policy.assign(old, layout, [3, 4, 7, 9])
        least = min(moved(layout, order) for order in itertools.permutations([3, 4, 7, 9]))
        assert moved(layout, smart.workers) == least < moved(layout, [3, 4, 7, 9]), (layout, smart)
    # Worker 9 replaced by 11: 7 and 3 keep their ranks (the greedy fill gives 9's rank to 4, which shares
    # its data shard, and 4's to the newcomer: not the least of all orders, but less than the sorted one).
    smart = policy.assign(old, Layout(fsdp=2, tp=2), [3, 4, 7, 11])
    assert smart.workers[:2] == (7, 3) and set(smart.workers) == {3, 4, 7, 11}, smart
    assert moved(smart.layout, smart.workers) < moved(smart.layout, [3, 4, 7, 11])


def test_memory_budget_rules_out_layouts_that_would_not_fit():
    import dataclasses

    cfg = tiny_config(global_batch=16)
    cost = CostModel(cfg.model, 16, cfg.data.seq_len, 8, cores=4)
    n = cfg.model.num_params()  # float64, every parameter trainable
    unlimited = Policy(cfg, cost)
    # The state terms are the boxes' bytes: weights + 2 moments, whole under dp, a quarter under fsdp=4; the
    # gradients are those alive at the step's peak moment (plan/memory.py), at most the whole of them under dp.
    whole, quarter = unlimited.memory.estimate(Layout(dp=4)).terms, unlimited.memory.estimate(Layout(fsdp=4)).terms
    assert whole["weights"] == n * 8 >= whole["grads"] and whole["moments"] == 2 * n * 8 and whole["gather"] == 0
    assert quarter["weights"] + quarter["moments"] == pytest.approx(3 * n * 8 / 4, rel=0.02) and quarter["gather"] > 0
    assert Layout(dp=4) in unlimited.layouts(4)

    budget = unlimited.memory.peak(Layout(fsdp=4)) * 1.05  # fits sharding by 4, not replicating
    assert unlimited.memory.peak(Layout(dp=4)) > budget
    runtime = dataclasses.replace(cfg.runtime, memory_per_worker_gb=budget / 1e9)
    tight = Policy(dataclasses.replace(cfg, runtime=runtime), cost)
    allowed = tight.layouts(4)
    assert allowed and Layout(dp=4) not in allowed and Layout(fsdp=4) in allowed
    assert all(tight.memory.peak(l) <= budget for l in allowed)
    assert tight.decide(None, [0, 1, 2, 3], 100).placement.layout in allowed
    refused = tight.decide(None, [0, 1, 2, 3], 100, forced=Layout(dp=4))  # an operator's request too
    assert isinstance(refused, Refuse) and "above the" in refused.reason and "memory_per_worker_gb" in refused.reason
    # One worker cannot hold it all: the job pauses and says which limit binds, by how much, and what would fit.
    paused = tight.decide(Placement(Layout(dp=2), (0, 1)), [0], 100, must_move=True)
    assert isinstance(paused, Pause) and "no layout fits 1 workers in" in paused.reason, paused
    assert "memory_per_worker_gb" in paused.reason, paused
    assert f"it would take 2 workers of {size(budget)} each (pp=2" in paused.reason, paused


def test_use_all_says_so_when_growing_is_not_predicted_faster():
    cfg = tiny_config(global_batch=16)
    cost = CostModel(cfg.model, 16, cfg.data.seq_len, 8, cores=2)  # 4 workers on 2 cores: no faster
    decision = Policy(cfg, cost, objective="use_all").decide(Placement(Layout(dp=2), (0, 1)), [0, 1, 2, 3], 100)
    assert decision.placement.layout.world == 4
    assert decision.step_seconds * 100 + decision.reshard_seconds > decision.current_step_seconds * 100
    assert "use_all" in decision.reason and "sooner" not in decision.reason
