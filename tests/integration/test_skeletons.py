"""Engine skeletons built ahead: reshards and a recovery that bind instead of rebuilding, with the math intact.

Both tests drive the shared worker pool directly (no controller), so that which skeleton exists when is
decided by the test, not by timing, and compare the final float64 state with the single-process reference.
"""

from __future__ import annotations

import time

import pytest

from bench.probes import skeletons
from elastic.core.layout import Layout, Placement
from elastic.driver.group import WorkerFailure
from elastic.driver.resharder import plan_move, reshard
from tests.helpers import tiny_config, worst_state_err
from tests.reference import train_reference


def _used_skeleton(report) -> bool:
    commits = [w["commit"] for w in report.workers.values() if "commit" in w]
    return bool(commits) and all(c["bound"] for c in commits)


def _step_while_building(group, placements, limit_s: float = 60.0) -> int:
    """Train until every build of ``placements`` is done; returns how many steps overlapped a build."""
    group.prepare(placements)
    steps, deadline = 0, time.monotonic() + limit_s
    while not all(group.build_done(p) for p in placements):
        assert time.monotonic() < deadline, "skeleton builds did not finish"
        group.step()
        steps += 1
    return steps


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_b_a_b_with_skeletons_equals_the_reference(pool):
    cfg = tiny_config(steps=40)  # the schedule's horizon; the run stops earlier, after the last move
    pool.cfg = cfg
    workers = tuple(pool.warm()[:4])
    a = Placement(Layout(dp=2, tp=2), workers)
    b = Placement(Layout(fsdp=2, pp=2, microbatches=2), workers[::-1])
    pool.setup(a)
    pool.step()
    overlapped = _step_while_building(pool, [b])  # B is built while A trains
    assert overlapped >= 1, "no step ran during the background build, so this test shows nothing about it"
    assert all(b in held for held in skeletons(pool, workers).values())
    used = []
    for target in (b, a, b):  # A and then B again come from the skeletons parked when the job left them
        used.append(_used_skeleton(reshard(pool, plan_move(pool, target), pool.committed, "round trip")))
        pool.step()
    assert used == [True, True, True]
    step, tensors = pool.gather_tensors()
    # How many steps ran while B was built depends on the machine; the reference runs as many.
    err, name = worst_state_err(tensors, train_reference(cfg, steps=step).tensors)
    assert err <= 1e-9, f"{name}: {err:.2e}"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_recovery_binds_the_fallback_and_drops_skeletons_naming_the_dead(fresh_pool):
    cfg = tiny_config(steps=40)  # the schedule's horizon; the run stops two steps after the recovery
    group = fresh_pool
    group.cfg = cfg
    workers = tuple(group.warm()[:4])
    victim = workers[3]
    current = Placement(Layout(dp=2, fsdp=2), workers)
    fallback = Placement(Layout(dp=3), workers[:3])  # where losing the victim would take the job
    never = Placement(Layout(fsdp=4), (workers[3], workers[2], workers[1], workers[0]))  # a move that never happens
    group.setup(current)
    group.step()
    _step_while_building(group, [fallback, never])
    group.kill(victim)
    with pytest.raises(WorkerFailure) as lost:
        group.step()
    assert victim in lost.value.dead
    survivors = workers[:3]
    group.settle(survivors)
    report = reshard(group, plan_move(group, fallback, alive=group.live()), group.committed, "recover")
    assert _used_skeleton(report), "recovery rebuilt the engines instead of binding the fallback skeleton"
    held = skeletons(group, survivors)
    assert all(never not in placements for placements in held.values()), held  # it named the dead worker
    for _ in range(2):  # the killed step, redone, and one more
        group.step()
    step, tensors = group.gather_tensors()
    err, name = worst_state_err(tensors, train_reference(cfg, steps=step).tensors)
    assert err <= 1e-9, f"{name}: {err:.2e}"
