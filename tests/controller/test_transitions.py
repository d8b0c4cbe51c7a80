"""The controller's transitions, one test each, on a fake worker group (no Ray, no processes).

In the manner of Ray Train v2's controller tests: the real controller, policy and cost model drive a
``FakeWorkerGroup`` whose faults the test schedules, and every test checks the states the controller
went through, what it told the operator, and that the run's steps stayed exactly-once.
"""

from __future__ import annotations

import dataclasses

import pytest

from elastic.control.controller import Controller
from elastic.control.events import AddWorkers, Drain, Pause, Relayout, Resume, SetBudget, Stop
from elastic.control.run import with_control
from elastic.control.states import Done, Paused, Running
from elastic.core.layout import Layout
from elastic.core.records import RecordKind
from elastic.plan.costmodel import CostModel
from elastic.plan.decisions import Stay
from elastic.plan.policy import Policy
from tests import helpers
from tests.controller.fake_group import FakeWorkerGroup
from tests.controller.fake_plane import FakePlane
from tests.helpers import tiny_config

pytestmark = pytest.mark.timeout(20)


def make(layout: str = "dp=2", workers: int = 2, steps: int = 12, policy=None, gather_tensors: bool = False,
         sources=(), **control):
    cfg = tiny_config(steps=steps, dataset="arithmetic", global_batch=8)
    cfg = cfg.replace(runtime=dataclasses.replace(cfg.runtime, workers=workers))
    cfg = with_control(cfg, **{"layout": layout, "objective": "use_all", "poll_interval_s": 0.0, **control})
    group, plane = FakeWorkerGroup(cfg), FakePlane()
    controller = Controller(cfg, group=group, plane=plane, policy=policy, progress=False,
                            gather_tensors=gather_tensors, sources=sources)
    controller.start()
    return controller, group, plane


def tick_until(controller: Controller, done, limit: int = 300) -> list[str]:
    """Tick until ``done(controller)``; returns the state names passed through (repeats collapsed)."""
    seen = [type(controller.state).__name__]
    for _ in range(limit):
        if done(controller):
            return seen
        controller.tick()
        if type(controller.state).__name__ != seen[-1]:
            seen.append(type(controller.state).__name__)
    raise AssertionError(f"not done after {limit} ticks; states {seen}")


def at_step(n: int):
    return lambda c: c.step >= n and isinstance(c.state, Running)


def finish(controller: Controller) -> None:
    tick_until(controller, lambda c: isinstance(c.state, Done))


def assert_exactly_once(controller: Controller, group: FakeWorkerGroup) -> None:
    """Steps 0..N-1 once each, every step's samples its global batch, and no worker applied a step twice."""
    cfg = controller.cfg
    helpers.assert_exactly_once(controller.history, cfg.train.steps, cfg.train.global_batch, cfg.data.num_samples)
    for w in group.workers.values():
        assert w.applied == sorted(set(w.applied)), f"worker {w.id} applied a step twice: {w.applied}"


def kinds(controller: Controller) -> list[str]:
    return [e["kind"] for e in controller.events if e["kind"] != RecordKind.TRANSITION]


def test_first_placement_then_steps_to_done():
    controller, group, _ = make()
    assert tick_until(controller, lambda c: isinstance(c.state, Done)) == ["Planning", "Launching", "Running",
                                                                            "Finishing", "Done"]
    assert group.placement.layout == Layout(dp=2) and group.committed == 12
    assert_exactly_once(controller, group)


def test_drain_reshards_then_runs():
    controller, group, plane = make(layout="dp=2,tp=2", workers=4)
    tick_until(controller, at_step(3))
    request = plane.request(Drain(reason="preemption notice", worker=1))
    assert tick_until(controller, lambda c: 1 not in c.group.live()) == ["Running", "Planning", "Resharding", "Running"]
    assert 1 not in group.placement.workers and group.placement.layout.world == 3
    assert plane.answers[request][0].startswith("moved to") and len(plane.answers[request]) == 1
    assert RecordKind.DRAINED in kinds(controller)
    finish(controller)
    assert_exactly_once(controller, group)


class CapacityDrop:
    """The cluster watcher's view of a draining node: its CPUs stop counting, in the same poll as the notice."""

    def __init__(self, workers: int) -> None:
        self.workers, self.group, self.sent = workers, None, False

    def poll(self, step: int) -> list:
        if self.sent or self.group is None or not self.group.draining:
            return []
        self.sent = True
        return [SetBudget(reason=f"cluster capacity -> {self.workers} workers", workers=self.workers)]


def test_a_node_ray_drains_moves_its_workers_shards_off_live_once():
    # The capacity drop is polled first (as the controller registers the cluster watcher before the drain
    # watcher): one loss, which must not lower the budget twice.
    capacity = CapacityDrop(workers=2)
    controller, group, _ = make(layout="fsdp=4", workers=4, sources=[capacity])
    group.node_of, capacity.group = {0: "node-a", 1: "node-b", 2: "node-a", 3: "node-b"}, group
    tick_until(controller, at_step(2))
    group.draining = {"node-b": None}  # Ray's notice: node-b goes (GCS DrainNode, as an autoscaler sends)
    tick_until(controller, lambda c: not {1, 3} & c.group.live())
    assert sorted(group.placement.workers) == [0, 2]
    texts = [e.get("text", "") for e in controller.events]
    assert any("Ray drains node node-b (worker 1" in t for t in texts), texts
    assert [e["workers"] for e in controller.events if e["kind"] == RecordKind.DRAINED] == [[1, 3]]
    assert RecordKind.RECOVERED not in kinds(controller)  # a live move: nothing lost, nothing replayed
    finish(controller)  # the notice stays up; the workers it named are gone, so it asks nothing more
    assert kinds(controller).count(RecordKind.RESHARD) == 1
    assert_exactly_once(controller, group)


@pytest.mark.parametrize("notice_s", [0.0, 3600.0])
def test_a_notice_shorter_than_the_move_snapshots_first_so_a_node_lost_mid_move_replays_nothing(notice_s):
    """fsdp=4 over two nodes, no periodic snapshots: node-b's shards have no copy elsewhere. Ray drains node-b and
    the node dies during the move's transfer. With a notice shorter than the move is trusted with, the job
    snapshots the step first, and the recovery restores it: nothing replayed. With an hour's notice it does
    not (the move would have finished), and the same loss replays from the seed."""
    import time

    controller, group, _ = make(layout="fsdp=4", workers=4, snapshot_every=0)
    group.node_of = {0: "node-a", 1: "node-b", 2: "node-a", 3: "node-b"}
    tick_until(controller, at_step(3))
    group.draining = {"node-b": time.time() + notice_s}
    group.faults.kill_at(1, phase="transfer").kill_at(3, phase="transfer")
    tick_until(controller, lambda c: c.recoveries)
    snapshots = [call for call in group.calls if call[0] == "snapshot"]
    recovery = controller.recoveries[0]
    if notice_s == 0.0:
        assert snapshots == [("snapshot", 3)], snapshots
        assert any("a drain notice ends in" in e.get("text", "") for e in controller.events)
        assert recovery["how"] == "snapshot of step 3" and recovery["steps_lost"] == 0, recovery
    else:
        assert snapshots == [] and recovery["how"].startswith("the seed") and recovery["steps_lost"] == 3, recovery
    finish(controller)
    assert_exactly_once(controller, group)


def test_a_ray_without_the_drain_state_call_does_not_end_the_job(caplog):
    controller, group, _ = make(layout="dp=2", workers=2)

    def missing():
        raise AttributeError("'GlobalState' object has no attribute 'get_draining_nodes'")

    group.draining_nodes = missing  # what an older or newer Ray would give ray_compat
    finish(controller)
    assert "preemption notices will not be seen" in caplog.text
    assert_exactly_once(controller, group)


def test_added_capacity_starts_in_the_background_then_reshards():
    controller, group, plane = make()
    group.hold_warmup = True
    tick_until(controller, at_step(2))
    plane.request(AddWorkers(reason="two nodes back", count=2))
    tick_until(controller, lambda c: c.group.starting)  # Planning started two workers, training went on
    assert isinstance(controller.state, Running) and group.placement.layout == Layout(dp=2)
    tick_until(controller, at_step(6))  # steps while the new workers warm up
    assert group.placement.layout == Layout(dp=2) and len(group.starting) == 2
    group.release_warmup()
    assert tick_until(controller, lambda c: c.group.placement.layout.world == 4) == [
        "Running", "Planning", "Resharding", "Running"]
    assert RecordKind.RESHARD in kinds(controller)
    finish(controller)
    assert_exactly_once(controller, group)


def test_crash_mid_step_recovers_from_replicas_without_losing_a_step():
    controller, group, _ = make()
    group.faults.kill_at(1, step=4, phase="step")
    states = tick_until(controller, lambda c: c.recoveries)
    assert states[-4:] == ["Running", "Recovering", "Resharding", "Running"]  # recovery moves like any move
    assert controller.recoveries[0]["how"] == "replicas" and controller.recoveries[0]["steps_lost"] == 0
    assert group.placement.workers == (0,) and controller.step == 4 == group.committed
    assert RecordKind.SCALE_OUT in kinds(controller)  # a replacement warms up meanwhile
    finish(controller)
    assert group.placement.layout == Layout(dp=2)  # back on two workers once the replacement was warm
    assert_exactly_once(controller, group)


def test_crash_after_every_rank_computed_the_step_counts_it_once():
    """A worker dies while the others apply a step they all computed: the step is committed, not redone."""
    controller, group, _ = make()
    group.faults.kill_at(1, step=4, phase="apply")
    tick_until(controller, lambda c: c.recoveries)
    assert controller.step == 5 == group.committed and [h.step for h in controller.history][-1] == 4
    assert group.workers[0].applied == [0, 1, 2, 3, 4]
    finish(controller)
    assert_exactly_once(controller, group)


def test_crash_mid_transfer_keeps_the_old_placement():
    controller, group, plane = make()
    tick_until(controller, at_step(2))
    plane.request(AddWorkers(reason="scale out", count=1))
    group.faults.kill_at(2, phase="transfer")
    states = tick_until(controller, lambda c: RecordKind.RESHARD_FAILED in kinds(c))
    assert states[-2:] == ["Resharding", "Running"]
    assert group.placement.workers == (0, 1) and 2 not in group.live()
    step = controller.step
    tick_until(controller, at_step(step + 2))  # the old placement trains on
    finish(controller)
    assert_exactly_once(controller, group)


def test_crash_mid_commit_recovers():
    controller, group, plane = make()
    tick_until(controller, at_step(2))
    plane.request(AddWorkers(reason="scale out", count=1))
    group.faults.kill_at(2, phase="commit")
    states = tick_until(controller, lambda c: c.recoveries)
    assert states[-4:] == ["Resharding", "Recovering", "Resharding", "Running"]
    assert "during commit" in next(e["text"] for e in controller.events if e["kind"] == RecordKind.RESHARD_FAILED)
    assert set(group.placement.workers) <= {0, 1, 3} and 2 not in group.live()
    finish(controller)
    assert_exactly_once(controller, group)


def test_a_second_loss_during_a_recovery_joins_its_report():
    """Worker 1 dies in a step; worker 2 dies during the recovery's move. One recovery is reported, naming
    both, timed from the first loss, with no step lost (replicas held every shard both times)."""
    controller, group, _ = make(layout="dp=4", workers=4)
    group.faults.kill_at(1, step=3, phase="step").kill_at(2, phase="transfer")
    tick_until(controller, lambda c: c.recoveries)
    assert [sorted(r["dead"]) for r in controller.recoveries] == [[1, 2]], controller.recoveries
    assert controller.recoveries[0]["steps_lost"] == 0
    assert [e["dead"] for e in controller.events if e["kind"] == RecordKind.FAILURE] == [[1]]
    assert any("2" in e["text"] for e in controller.events if e["kind"] == RecordKind.RESHARD_FAILED)
    finish(controller)
    assert_exactly_once(controller, group)


def test_no_replica_recovers_from_the_snapshot_and_replays():
    controller, group, _ = make(layout="fsdp=2", snapshot_every=2)
    group.faults.kill_at(1, step=5, phase="step")
    tick_until(controller, lambda c: c.recoveries)
    assert controller.recoveries[0]["how"] == "snapshot of step 4" and controller.recoveries[0]["steps_lost"] == 1
    assert controller.step == 4 == group.committed
    finish(controller)
    assert_exactly_once(controller, group)


def test_no_replica_and_no_snapshot_replays_from_the_seed():
    controller, group, _ = make(layout="fsdp=2", snapshot_every=0)
    group.faults.kill_at(1, step=3, phase="step")
    tick_until(controller, lambda c: c.recoveries)
    assert controller.recoveries[0]["how"].startswith("the seed") and controller.recoveries[0]["steps_lost"] == 3
    assert controller.step == 0 == group.committed
    finish(controller)
    assert_exactly_once(controller, group)


def test_a_worker_lost_before_the_first_step_is_survived():
    controller, group, _ = make(layout="fsdp=2")
    group.faults.kill_at(0, step=0, phase="step")
    finish(controller)
    assert controller.recoveries[0]["steps_lost"] == 0
    assert_exactly_once(controller, group)


def test_a_worker_lost_while_the_final_tensors_are_gathered_is_survived():
    controller, group, _ = make(steps=6, gather_tensors=True)
    group.faults.kill_at(1, phase="gather")
    states = tick_until(controller, lambda c: isinstance(c.state, Done))
    first = states.index("Finishing")
    assert states[first + 1] == "Recovering" and states[-2:] == ["Finishing", "Done"]
    assert controller.state.tensors == {"applied": list(range(6))}  # gathered from the survivors, complete
    assert_exactly_once(controller, group)


def test_a_worker_lost_while_the_workers_write_the_model_is_survived(monkeypatch, tmp_path):
    """Finishing with ``export_dir``: the workers' export (``driver/exporter.py``, stood in for here by a call on
    the fake group's workers) losing a worker recovers and exports again from the survivors; ``Done`` carries it."""
    from elastic.control import handlers
    from elastic.driver.exporter import ExportReport

    def export(group, cfg, run_dir):
        group._involve(group.placement.workers, "export", group.committed)
        return ExportReport({"model": tmp_path / "model"}, {"model.safetensors": group.placement.workers[0]},
                            1, 0, 1, 0.0)

    monkeypatch.setattr(handlers, "export_from_workers", export)
    controller, group, _ = make(steps=6)
    controller.export_dir = str(tmp_path)
    group.faults.kill_at(1, phase="export")
    states = tick_until(controller, lambda c: isinstance(c.state, Done))
    first = states.index("Finishing")
    assert states[first + 1] == "Recovering" and states[-2:] == ["Finishing", "Done"]
    assert controller.state.export.folders == {"model": tmp_path / "model"} and controller.state.tensors is None
    assert [e["kind"] for e in controller.events].count("export") == 1
    assert_exactly_once(controller, group)


def test_a_worker_lost_while_forming_the_first_placement_is_planned_around():
    controller, group, _ = make(layout="dp=2", workers=3)
    group.faults.kill_at(1, phase="setup")
    states = tick_until(controller, lambda c: c.step >= 1)
    assert states[:4] == ["Planning", "Launching", "Planning", "Launching"]
    assert 1 not in group.placement.workers
    finish(controller)
    assert_exactly_once(controller, group)


def test_too_few_workers_pause_until_resources_come_back():
    controller, group, plane = make(min_workers=2)
    tick_until(controller, at_step(2))
    plane.request(Drain(reason="preempted", worker=0))
    assert tick_until(controller, lambda c: isinstance(c.state, Paused))[-2:] == ["Planning", "Paused"]
    assert "needs at least 2" in controller.state.reason
    steps = controller.step
    for _ in range(5):
        controller.tick()
    assert isinstance(controller.state, Paused) and controller.step == steps  # nothing trains while paused
    plane.request(AddWorkers(reason="replacement node", count=1))
    tick_until(controller, lambda c: c.group.placement.workers == (1, 2) and isinstance(c.state, Running))
    assert 0 not in group.live()
    finish(controller)
    assert_exactly_once(controller, group)


def test_operator_pause_resume_and_stop_are_answered_once_each():
    controller, group, plane = make(steps=100)
    tick_until(controller, at_step(2))
    pause = plane.request(Pause(reason="operator pause"))
    assert tick_until(controller, lambda c: isinstance(c.state, Paused))[-2:] == ["Planning", "Paused"]
    steps = controller.step
    for _ in range(5):
        controller.tick()
    assert controller.step == steps
    resume = plane.request(Resume(reason="operator resume"))
    tick_until(controller, at_step(steps + 2))
    stop = plane.request(Stop(reason="operator stop"))
    assert tick_until(controller, lambda c: isinstance(c.state, Done))[-3:] == ["Planning", "Finishing", "Done"]
    assert plane.answers[pause] == ["paused"]
    assert len(plane.answers[resume]) == 1 and plane.answers[resume][0].startswith("keep dp=2")
    assert plane.answers[stop] == [f"stopping at step {controller.step}"]
    assert controller.state.reason == "stopped on request"


def test_invalid_relayout_is_refused_exactly_once_with_one_answer():
    controller, group, plane = make()
    tick_until(controller, at_step(2))
    bad = plane.request(Relayout(reason="operator", layout=Layout(tp=3)))
    stranger = plane.request(Drain(reason="operator", worker=42))
    tick_until(controller, at_step(4))
    assert plane.answers[bad] == ["refused: layout tp=3: tp=3 does not divide n_heads=4 (4 % 3 = 1); choose tp "
                                  "among the common divisors of n_heads=4, n_kv_heads=2 and ffn_dim=64; training "
                                  "continues on dp=2"]
    assert plane.answers[stranger] == ["refused: worker 42 is not part of this job; training continues on dp=2"]
    assert group.placement.layout == Layout(dp=2) and kinds(controller).count(RecordKind.REFUSED) == 2


def test_two_events_in_one_tick_make_one_reshard():
    controller, group, plane = make(layout="dp=2,tp=2", workers=4)
    tick_until(controller, at_step(2))
    drain = plane.request(Drain(reason="preemption notice", worker=3))
    relayout = plane.request(Relayout(reason="operator", layout=Layout(fsdp=3)))
    tick_until(controller, lambda c: 3 not in c.group.live())
    assert len(controller.reshards) == 1 and group.placement.layout == Layout(fsdp=3)
    assert 3 not in group.placement.workers
    assert len(plane.answers[drain]) == len(plane.answers[relayout]) == 1
    assert plane.answers[drain][0].startswith("moved to fsdp=3") and plane.answers[drain] == plane.answers[relayout]
    finish(controller)
    assert_exactly_once(controller, group)


def test_a_policy_that_declines_to_move_keeps_the_placement():
    class Stays(Policy):
        def decide(self, current, *args, **kwargs):
            return Stay("no predicted gain") if current is not None else super().decide(current, *args, **kwargs)

    cfg = tiny_config(steps=12, dataset="arithmetic")
    controller, group, plane = make(policy=Stays(cfg, CostModel(cfg.model, 8, 16, 8), "use_all"))
    tick_until(controller, at_step(2))
    request = plane.request(AddWorkers(reason="more", count=2))
    tick_until(controller, at_step(4))
    assert plane.answers[request] == ["keep dp=2 on 2 workers (no predicted gain)"]
    assert not any(call[0] == "start" for call in group.calls) and RecordKind.KEEP in kinds(controller)
    assert isinstance(controller.state, Running)


def test_every_transition_is_recorded_and_the_listeners_hear_it():
    controller, group, _ = make(steps=3)
    heard = []
    controller.listeners.append(lambda t: heard.append((type(t.previous).__name__, type(t.next).__name__)))
    finish(controller)
    recorded = [(e["from"], e["to"]) for e in controller.events if e["kind"] == RecordKind.TRANSITION]
    assert recorded == [("planning", "launching"), ("launching", "running"), ("running", "finishing"),
                        ("finishing", "done")]
    changes = [(a, b) for a, b in heard if a != b]  # listeners also hear each tick that stays in Running
    assert changes == [(a.title(), b.title()) for a, b in recorded]  # every recorded transition heard, in order
