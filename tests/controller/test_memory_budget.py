"""Memory budgets through the real controller on the fake group: a budget from the nodes' memory (as the
controller derives it from Ray) keeps a job off layouts predicted not to fit when workers go."""

from __future__ import annotations

import pytest

from elastic.core.layout import Layout
from elastic.core.records import RecordKind
from elastic.plan.memory_budgets import HEADROOM
from tests.controller.test_transitions import CapacityDrop, assert_exactly_once, finish, make, tick_until

pytestmark = pytest.mark.timeout(20)


def test_when_a_node_goes_the_job_shards_instead_of_replicating_what_does_not_fit():
    capacity = CapacityDrop(workers=2)
    controller, group, _ = make(layout="fsdp=4", workers=4, sources=[capacity])
    memory = controller.policy.memory
    sharded, replicated = memory.peak(Layout(fsdp=2)), memory.peak(Layout(dp=2))
    assert sharded < replicated
    per_worker = (sharded + replicated) // 2  # fits fsdp=2, not dp=2
    group.node_of, capacity.group = {0: "node-a", 1: "node-b", 2: "node-a", 3: "node-b"}, group
    group.node_bytes = {"node-a": int(2 * per_worker / HEADROOM) + 2, "node-b": int(2 * per_worker / HEADROOM) + 2}
    tick_until(controller, lambda c: c.step >= 2)
    group.draining = {"node-b": None}
    tick_until(controller, lambda c: not {1, 3} & c.group.live())
    layout = group.placement.layout
    assert sorted(group.placement.workers) == [0, 2] and layout.dp == 1 and layout.world == 2, layout
    assert memory.peak(layout) <= controller.policy.budgets[0]
    finish(controller)
    assert_exactly_once(controller, group)


def test_a_lost_worker_with_nowhere_to_fit_pauses_saying_what_and_how_many():
    controller, group, _ = make(layout="fsdp=2", workers=2, min_workers=1)
    tick_until(controller, lambda c: c.step >= 2)
    group.node_bytes = {"node-0": 1000, "node-1": 1000}  # far too small for anything but the placement running
    group.fail_starts = True  # no replacement comes
    group.faults.kill_at(1, phase="step")
    tick_until(controller, lambda c: any(e["kind"] == RecordKind.PAUSE for e in c.events))
    paused = [e["text"] for e in controller.events if e["kind"] == RecordKind.PAUSE][0]
    assert "no layout fits 1 workers in 0.00 MB each" in paused and "the smallest predicted peak is" in paused
    assert " MB per worker (" in paused and "workers fits" in paused, paused
