"""Invariant 1, 2 and 4 under fire: SIGKILLs mid-step, mid-collective and mid-reshard.

A seeded schedule kills worker processes from outside (by PID). The first loss hits a layout
with no replica (fsdp x tp), so it must come back from the in-memory snapshot and replay; a
later one hits a replicated layout; one lands inside a reshard's transfer. The float64 run must
end with the uninterrupted single-process run's weights, consume every sample exactly once, and
no recovery may take more than 15 s.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from elastic.control.controller import Controller, ControllerOptions
from elastic.control.events import Relayout
from elastic.control.sources import ScriptedEvents
from elastic.control.states import Resharding, Running
from elastic.core.layout import Layout
from elastic.driver.group import WorkerFailure
from tests.helpers import DelayTransfers, tiny_config, worst_state_err
from tests.integration.test_reshard_live import assert_exactly_once
from tests.reference import train_reference


def assert_no_lingering_workers(handles) -> None:
    """Every worker actor the run ever had is gone after shutdown (killed ones and survivors alike)."""
    import ray
    from ray.exceptions import RayActorError

    for actor in handles.values():
        with pytest.raises(RayActorError):
            ray.get(actor.info.remote(), timeout=30)


class ChaosMonkey(threading.Thread):
    """Kills per a seeded schedule: (kind, step). kind is 'step' (during training) or 'reshard'."""

    def __init__(self, controller: Controller, schedule, seed: int) -> None:
        super().__init__(daemon=True)
        self.controller, self.schedule, self.rng = controller, schedule, random.Random(seed)
        self.kills: list[dict] = []

    def run(self) -> None:
        c = self.controller
        for kind, at in self.schedule:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                ready = c.step >= at and isinstance(c.state, Resharding if kind == "reshard" else Running)
                if ready and c.group.placement is not None:
                    break
                time.sleep(0.002)
            time.sleep(self.rng.uniform(0.3, 0.6) if kind == "reshard" else self.rng.uniform(0.0, 0.05))
            placement = c.group.placement
            victim = self.rng.choice([w for w in placement.workers if w in c.group.live()])
            layout = str(placement.layout)
            try:
                c.group.kill(victim)
            except (KeyError, ProcessLookupError):
                continue
            self.kills.append({"kind": kind, "worker": victim, "step": c.step, "layout": layout,
                               "at": time.perf_counter()})


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_chaos_run_equals_the_uninterrupted_run(ray_session):
    cfg = tiny_config(steps=30, global_batch=8)
    ref_state = train_reference(cfg).tensors
    # fsdp=3 keeps everything local (each dp=3 replica holds all); dp=2 from fsdp=3 moves data.
    script = ScriptedEvents({10: [Relayout(reason="operator", layout=Layout(fsdp=3))],
                             14: [Relayout(reason="operator", layout=Layout(dp=2))]})
    controller = Controller(cfg, ControllerOptions(layout=Layout(fsdp=2, tp=2), objective="use_all",
                                                   snapshot_every=4, sources=[script], progress=False))
    monkey = ChaosMonkey(controller, [("step", 5), ("reshard", 14), ("step", 22)], seed=7)

    def delay_transfers(transition):  # test-side fault injection: a window to kill in, on every placement
        if isinstance(transition.next, Running) and not isinstance(transition.previous, Running):
            try:
                controller.group.run({w: DelayTransfers(1.0) for w in controller.group.placement.workers})
            except WorkerFailure:  # a kill landed just now: the next recovery installs it again
                pass
        handles.update({w: controller.group.handle(w) for w in controller.group.live()})

    controller.listeners.append(delay_transfers)
    monkey.start()
    handles = {}
    try:
        controller.start()
        result = controller.run_started()
    finally:
        controller.shutdown()
    assert_no_lingering_workers(handles)
    assert len(monkey.kills) == 3, monkey.kills
    assert monkey.kills[0]["layout"] == "fsdp=2,tp=2"  # no replica: the snapshot must serve
    recovered = [e for e in result.events if e["kind"] == "recovered"]
    assert any("snapshot" in e["how"] for e in recovered), [e["text"] for e in result.events]
    failures = [e for e in result.events if e["kind"] in ("failure", "reshard failed")]
    assert len(failures) >= 3
    # Every kill is followed by a recovery (or a reshard that fell back to the old placement) within 15 s.
    for kill in monkey.kills:
        started = controller.journal.started
        after = [started + e["time"] for e in result.events
                 if e["kind"] in ("recovered", "reshard", "reshard failed") and started + e["time"] > kill["at"]]
        assert after and min(after) - kill["at"] < 15.0, (kill, result.events)
    err, name = worst_state_err(result.tensors, ref_state)
    assert err <= 1e-9, f"{name}: {err:.2e}"
    assert_exactly_once(cfg, result.history)
