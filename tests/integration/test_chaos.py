"""Invariants 1, 2 and 4 under fire: SIGKILLs at every point of a run, against the independent reference.

A seeded schedule kills worker processes from outside (by PID), each in a phase it makes sure of:

- start-up: the first placement is formed but has not trained (no replica, no snapshot: replay from
  the seed);
- mid-step: at a random moment of a step (the layout has no replica: a snapshot or replay serves);
- mid-collective: the victim stalls before its gradient-norm all-reduce and dies there, while its
  peers wait inside that collective;
- mid-reshard: inside a reshard's transfer;
- a checkpoint write: the victim stalls while writing its shard;
- the final gather of the tensors, after the last step.

The float64 run must end with the reference's weights, consume every sample exactly once, and each
loss must be noticed (naming its victim) and recovered from before the next kill; how long that takes is
printed, and measured by ``bench/failures.py``. Stalls and delays are test-side worker tasks.
"""

from __future__ import annotations

import random
import re
import threading
import time
from pathlib import Path

import pytest

from elastic.control.controller import Controller
from elastic.control.events import Relayout
from elastic.control.run import with_control
from elastic.control.sources import ScriptedEvents
from elastic.control.states import Finishing, Launching, Running
from elastic.core.layout import Layout
from elastic.driver.ray_group import RayWorkerGroup
from tests.helpers import (
    DelayTransfers,
    StallBeforeClip,
    StallCheckpointWrite,
    StallFinalGather,
    WaitForWorkers,
    tiny_config,
    worst_state_err,
)
from tests.integration.test_reshard_live import assert_exactly_once
from tests.reference import train_reference


def assert_no_lingering_workers(handles) -> None:
    """Every worker actor the run ever had is gone after shutdown (killed ones and survivors alike)."""
    import ray
    from ray.exceptions import RayActorError

    alive = {}
    for worker, actor in handles.items():
        try:
            alive[worker] = ray.get(actor.info.remote(), timeout=30)
        except RayActorError:
            pass
    assert not alive, f"workers still alive after shutdown: {alive}"


class ChaosMonkey(threading.Thread):
    """Kills per a schedule of (phase, step). The controller's listener arms each phase when the run gets
    there (installing the phase's stall on the victim, from the controller's own thread); this thread waits
    until the victim is inside its stall (the stall's marker file), kills it there, and records the
    controller's state at that moment."""

    STALL_S = 3.0  # how long a stalled victim would wait before it carries on (it is killed inside: no cost)
    # The window each phase opens on its victim: a stall, or a pause inside every transfer after its group formed.
    STALLS = {"collective": StallBeforeClip, "checkpoint": StallCheckpointWrite, "gather": StallFinalGather,
              "reshard": DelayTransfers}

    def __init__(self, controller: Controller, schedule: list[tuple[str, int]], seed: int, folder: Path) -> None:
        super().__init__(daemon=True)
        self.c, self.schedule, self.rng = controller, list(schedule), random.Random(seed)
        self.folder = folder  # where the victims' marker files appear
        self.kills: list[dict] = []
        self.armed: tuple[str, int, Path | None] | None = None  # (phase, victim, marker)
        self._event = threading.Event()

    # ---- in the controller's thread ----
    def listen(self, transition) -> None:
        c = self.c
        if not self.schedule or self.armed is not None or not isinstance(transition.next, (Running, Finishing)):
            return
        phase, at = self.schedule[0]
        placement = c.group.placement
        if c.step < at or placement is None:
            return
        victim = self.rng.choice([w for w in placement.workers if w in c.group.live()])
        if phase == "checkpoint":
            victim = placement.workers[0]  # rank 0 writes a shard in every layout (a replica may write none)
        if phase == "startup":
            if not isinstance(transition.previous, Launching):
                return
            self._kill(phase, victim)  # before the first step, synchronously
            self.schedule.pop(0)
            return
        marker = None
        if phase in self.STALLS:
            marker = self.folder / f"{phase}-{victim}"
            c.group.run({victim: self.STALLS[phase](self.STALL_S, marker=str(marker))})
        self.schedule.pop(0)
        self.armed = (phase, victim, marker)
        self._event.set()

    # ---- in this thread ----
    def run(self) -> None:
        while True:
            if not self._event.wait(timeout=300):
                return
            self._event.clear()
            phase, victim, marker = self.armed
            if marker is None:  # a plain step: at a random moment of it
                time.sleep(self.rng.uniform(0.0, 0.05))
            else:
                self._wait_for(marker)
            if phase == "collective":
                self._wait_for_peers_in_collective(victim)
            self._kill(phase, victim)
            self.armed = None
            if not self.schedule:
                return

    @staticmethod
    def _wait_for(marker: Path, limit_s: float = 120.0) -> None:
        """Until the victim is inside its stall (it made the marker file); a stall never reached is killed
        outside its phase, which the test's phase checks then report."""
        deadline = time.monotonic() + limit_s
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.002)

    def _wait_for_peers_in_collective(self, victim: int, limit_s: float = 10.0) -> None:
        """Until every peer of the stalled victim is blocked inside the all-reduce it waits for (their probes
        say so), so the kill lands mid-collective whatever the machine's load."""
        import ray

        group = self.c.group
        peers = [w for w in group.placement.workers if w != victim and w in group.live()]
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            try:
                looks = ray.get([group.handle(w).probe.remote() for w in peers], timeout=limit_s)
            except ray.exceptions.RayError:  # a peer that does not answer: kill now, the test's checks judge
                return
            if all(look["in_collective"] for look in looks):
                return
            time.sleep(0.01)

    def _kill(self, phase: str, victim: int) -> None:
        c = self.c
        layout = str(c.group.placement.layout)
        c.group.kill(victim)
        self.kills.append({"phase": phase, "worker": victim, "step": c.step, "layout": layout,
                           "state": type(c.state).__name__, "trained": len(c.history), "at": time.perf_counter()})


CHECKPOINT_EVERY = 18
# (phase, the step from which it is armed); the relayout that is killed mid-reshard comes at step 14.
# A second mid-step kill, on a layout with replicas (dp=4), is left to test_hangs (a worker stopped mid-step, killed,
# recovered from its replicas at the reference weights), test_families_train (Qwen3) and test_grpo_elastic: here it
# cost a replacement and 6 more steps.
SCHEDULE = [("startup", 0), ("step", 5), ("collective", 8), ("reshard", 13), ("checkpoint", 17), ("gather", 23)]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_chaos_run_equals_the_uninterrupted_run(ray_session, tmp_path):
    cfg = tiny_config(steps=24, global_batch=8, ahead=True)
    ref_state = train_reference(cfg).tensors
    # fsdp=4 at step 3: the mid-step kill at 5 hits a layout with no replica, so the step-4 snapshot serves.
    # fsdp=3 keeps everything local (each dp=3 replica holds all); dp=2 from fsdp=3 moves data.
    script = ScriptedEvents({3: [Relayout(reason="operator", layout=Layout(fsdp=4))],
                             10: [Relayout(reason="operator", layout=Layout(fsdp=3))],
                             14: [Relayout(reason="operator", layout=Layout(dp=2))]})
    # Replacements warm up before training goes on (WaitForWorkers), so every phase starts on four workers.
    group = RayWorkerGroup(cfg)
    cfg = with_control(cfg, layout=Layout(fsdp=2, tp=2), objective="use_all", snapshot_every=4,
                       checkpoint_dir=str(tmp_path), checkpoint_every=CHECKPOINT_EVERY)
    controller = Controller(cfg, group=group, sources=[script, WaitForWorkers(group)], progress=False)
    (tmp_path / "markers").mkdir()
    monkey = ChaosMonkey(controller, SCHEDULE, seed=7, folder=tmp_path / "markers")
    handles = {}

    def track(transition):  # every worker the run ever had, for the check after shutdown
        handles.update({w: controller.group.handle(w) for w in controller.group.live()})

    controller.listeners += [track, monkey.listen]
    monkey.start()
    try:
        controller.start()
        result = controller.run_started()
    finally:
        controller.shutdown()
        group.shutdown()  # the test made the group, so it ends it
    assert_no_lingering_workers(handles)
    kills = {k["phase"]: k for k in reversed(monkey.kills)}  # a phase's first kill
    assert [k["phase"] for k in monkey.kills] == [phase for phase, _ in SCHEDULE], monkey.kills
    # Each kill landed in its phase.
    assert kills["startup"]["step"] == 0 and kills["startup"]["trained"] == 0  # formed, nothing trained yet
    assert kills["reshard"]["state"] == "Resharding" and kills["gather"]["state"] == "Finishing"
    texts = [e.get("text", "") for e in result.events if e["kind"] == "failure"]
    # A checkpoint is written in the background: the kill during its write is noticed by whichever call meets
    # the dead worker first (the write, or the next step); the checkpoint of that step is dropped, not half-used.
    started = [e for e in result.events if e["kind"] == "checkpoint" and "started" in e["text"]]
    assert started and not (tmp_path / f"step_{started[0]['of_step']:06d}").exists()  # dropped whole
    assert any("final tensors" in t for t in texts)
    assert result.recoveries[0]["how"].startswith("the seed")  # nothing else held the start-up's shards
    assert kills["step"]["layout"] == "fsdp=4" and result.recoveries[1]["how"] == "snapshot of step 4"
    recovered = [e for e in result.events if e["kind"] == "recovered"]
    print("\nkills and recoveries:")
    started = controller.journal.started
    ends = [k["at"] for k in monkey.kills[1:]] + [float("inf")]
    for kill, next_kill in zip(monkey.kills, ends, strict=True):
        after = [started + e["time"] for e in result.events
                 if e["kind"] in ("recovered", "reshard", "reshard failed") and started + e["time"] > kill["at"]]
        noticed = [e for e in result.events
                   if e["kind"] in ("failure", "reshard failed") and started + e["time"] > kill["at"]]
        # Each loss is noticed, naming its victim, and the job trains again, before the next kill. Timings are
        # printed here and measured by bench/failures.py (notice, training again) and bench/abort_release.py.
        assert noticed and after, (kill, result.events)
        assert started + noticed[0]["time"] <= min(after) < next_kill, (kill, result.events)
        named = re.compile(rf"worker(\(s\))? \[?{kill['worker']}\b")
        assert any(kill["worker"] in e.get("dead", []) or named.search(e.get("text", ""))
                   for e in noticed if started + e["time"] < next_kill), (kill, noticed)
        print(f"  {kill['phase']:10} worker {kill['worker']} at step {kill['step']} ({kill['layout']}, "
              f"{kill['state']}): noticed after {started + noticed[0]['time'] - kill['at']:.2f} s, "
              f"training again after {min(after) - kill['at']:.2f} s")
        if kill["phase"] == "collective":  # the peers were released by the cut: the victim's death, no timeout
            assert "timed out" not in noticed[0].get("text", "").lower(), noticed[0]
    assert len(recovered) >= len(SCHEDULE) - 1
    err, name = worst_state_err(result.tensors, ref_state)
    assert err <= 1e-9, f"{name}: {err:.2e}"
    assert_exactly_once(cfg, result.history)
