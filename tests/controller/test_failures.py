"""Failures with no dead process, repeated failures, and workers that cannot start, on the fake group."""

from __future__ import annotations

import pytest

from elastic.core.layout import Layout
from elastic.core.records import RecordKind
from tests.controller.test_transitions import assert_exactly_once, finish, kinds, make, tick_until

pytestmark = pytest.mark.timeout(20)


def test_a_call_that_fails_with_every_process_alive_gets_its_culprit_replaced():
    """A bug or a corrupted worker: no process died, so retrying as is would fail again. The first failing
    worker is killed and recovery replaces it, as after a crash."""
    controller, group, _ = make(layout="dp=2")
    group.faults.fail_at(1, step=3, phase="step")
    tick_until(controller, lambda c: c.recoveries)
    assert 1 not in group.live() and controller.recoveries[0]["dead"] == [1]
    assert any("failed with every process alive; killed it" in e.get("text", "") for e in controller.events)
    finish(controller)
    assert group.placement.layout == Layout(dp=2)  # the replacement joined
    assert_exactly_once(controller, group)


def test_the_same_step_failing_again_and_again_stops_the_job_in_one_line():
    controller, group, _ = make(layout="dp=2", workers=2, max_step_failures=3)
    for worker in (0, 1, 2, 3, 4):  # whoever holds the rank fails at step 3, again and again
        group.faults.fail_at(worker, step=3, phase="step")
    with pytest.raises(RuntimeError, match=r"step 3 failed 3 times \(culprits \[\d, \d, \d\]\), so the job stops"):
        tick_until(controller, lambda c: False, limit=500)
    assert kinds(controller).count(RecordKind.RECOVERED) == 2


def test_a_job_that_cannot_start_enough_workers_says_why_instead_of_waiting():
    controller, group, _ = make(layout="dp=2", min_workers=2)
    tick_until(controller, lambda c: c.step >= 2)
    group.fail_starts = True
    group.trouble = "4 worker warm-ups failed; the last: worker 5: ModuleNotFoundError: No module named 'mylib'"
    group.faults.kill_at(1, phase="step")
    with pytest.raises(RuntimeError, match="needs 2 workers and has 1, and cannot start more: 4 worker warm-ups"):
        tick_until(controller, lambda c: False)
    assert ("start", 1) in group.calls  # it did try to replace the lost worker


def test_a_snapshot_that_lost_a_part_is_dropped_and_recovery_falls_back():
    """Ray lost a snapshot part (its only copy died with a node): the restore fails on a live worker. That is
    the snapshot's fault, not the worker's: recovery drops it and rebuilds from the next source (here the
    seed), instead of blaming and killing the worker."""
    controller, group, _ = make(layout="fsdp=2", snapshot_every=2)
    group.faults.kill_at(1, step=5, phase="step")
    group.faults.fail_at(0, phase="restore", why="ObjectReconstructionFailedError: Failed to retrieve object 6be3")
    tick_until(controller, lambda c: c.recoveries)
    recovered = [e for e in controller.events if e["kind"] == RecordKind.RECOVERED]
    assert "from the seed" in recovered[0]["text"], recovered
    assert 0 in group.live() and not any("killed it" in e.get("text", "") for e in controller.events)
    finish(controller)
    assert_exactly_once(controller, group)
