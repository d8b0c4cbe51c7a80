"""Snapshots and checkpoints only at a workload's restart points (GRPO: its step boundaries), on the fake group.

A workload with ``restart_every = 2`` stands for GRPO with ``num_iterations = 2``: its driver keeps state
between restart points (the rollout batch) that no snapshot holds, so a restore must land on one.
"""

from __future__ import annotations

import dataclasses

import pytest

from elastic.control.controller import Controller
from elastic.control.run import with_control
from elastic.control.safekeeping import restart_interval
from elastic.control.workload import LMWorkload
from elastic.core.layout import Layout, Placement
from elastic.core.records import RecordKind
from tests.controller.fake_group import FakeWorkerGroup
from tests.controller.fake_plane import FakePlane
from tests.controller.test_transitions import assert_exactly_once, finish, tick_until
from tests.helpers import tiny_config
from tests.reference import train_reference
from tests.unit.test_checkpoint import write_checkpoint

pytestmark = pytest.mark.timeout(20)


class EveryOther(LMWorkload):
    name = "every-other"
    restart_every = 2


def make(steps: int, **options):
    """As ``test_transitions.make`` (fsdp=2 on 2 workers: no replica), with the ``EveryOther`` workload."""
    cfg = tiny_config(steps=steps, dataset="arithmetic", global_batch=8)
    cfg = cfg.replace(runtime=dataclasses.replace(cfg.runtime, workers=2))
    cfg = with_control(cfg, layout=Layout(fsdp=2), objective="use_all", poll_interval_s=0.0, **options)
    group = FakeWorkerGroup(cfg)
    controller = Controller(cfg, group=group, plane=FakePlane(), workload=EveryOther(), progress=False,
                            gather_tensors=False)
    controller.start()
    return controller, group


def test_restart_interval_rounds_up_to_a_multiple():
    assert [restart_interval(k, 2) for k in (0, 1, 2, 3, 4, 5)] == [0, 2, 2, 4, 4, 6]
    assert restart_interval(5, 1) == 5 and restart_interval(4, 3) == 6


def test_snapshots_only_at_restart_points_and_a_mid_point_loss_restores_one():
    controller, group = make(steps=12, snapshot_every=3)
    redundancy = next(e["text"] for e in controller.events if e["kind"] == RecordKind.REDUNDANCY)
    assert "restart points (every 2 steps): snapshot_every 3 -> 4" in redundancy
    group.faults.kill_at(1, step=5, phase="step")  # the second of a pair of steps: step 4 is the restart point
    tick_until(controller, lambda c: c.recoveries)
    assert controller.recoveries[0]["how"] == "snapshot of step 4" and controller.step == 4 == group.committed
    finish(controller)
    assert_exactly_once(controller, group)
    assert sorted({step for call, step, *_ in group.calls if call == "snapshot"}) == [4, 8]


def test_a_loss_before_the_first_restart_point_snapshot_replays_from_the_seed():
    controller, group = make(steps=8, snapshot_every=3)
    group.faults.kill_at(1, step=3, phase="step")  # a snapshot every 3 steps would have held step 3
    tick_until(controller, lambda c: c.recoveries)
    assert controller.recoveries[0]["how"].startswith("the seed") and controller.step == 0
    finish(controller)
    assert_exactly_once(controller, group)


def test_resuming_a_checkpoint_between_restart_points_is_refused(tmp_path):
    cfg = tiny_config(steps=8, dataset="arithmetic")
    full = train_reference(cfg, steps=0).tensors
    folder = write_checkpoint(tmp_path, cfg, full, Placement(Layout(), (0,)), step=3)
    with pytest.raises(ValueError, match=r"step 3, which is not a restart point .*\(a multiple of 2 steps\)"):
        Controller(with_control(cfg, resume=str(folder)), workload=EveryOther())
    write_checkpoint(tmp_path, cfg, full, Placement(Layout(), (0,)), step=4)
    resumed = Controller(with_control(cfg, resume=str(tmp_path / "step_000004")), workload=EveryOther(),
                         group=_NoGroup(cfg))
    assert resumed.resume_from == tmp_path / "step_000004"  # a restart point: accepted, and resumed from


class _NoGroup:
    """Enough of a worker group for a controller that is built and never started."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def cluster_cpus(self) -> int:
        return 2
