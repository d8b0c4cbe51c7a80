"""A step that is only slow completes; a worker that stops answering is found, killed and recovered from.

The deadlines are shortened through config (a 1 s floor, twice the slowest recent step, a 2 s probe) so the
test is quick; the rule is the production one (``driver/deadlines.py``). A slow batch makes every worker's
next step take seconds instead of milliseconds: the driver probes, finds every worker computing, and lets
the step finish. Then one worker is SIGSTOPped (sockets open, Ray still calls it alive, the way a stuck
filesystem read or a deadlock looks): it does not answer the probe, is killed, and the job recovers from
its replicas and ends at the reference weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time

import pytest

from elastic.control.controller import Controller
from elastic.control.run import with_control
from elastic.control.states import Running
from tests import helpers
from tests.helpers import SlowNextStep, tiny_config, worst_state_err
from tests.reference import train_reference

SLOW_AT, STOP_AT, SLOW_S = 4, 8, 2.0


@pytest.mark.timeout(240)
def test_a_slow_step_completes_and_a_stopped_worker_is_killed_and_recovered_from(fresh_pool):
    cfg = tiny_config(steps=14)
    cfg = cfg.replace(runtime=dataclasses.replace(cfg.runtime, deadline_floor_s=1.0, deadline_factor=2.0,
                                                  ping_timeout_s=2.0))
    cfg = with_control(cfg, layout="dp=2,fsdp=2", objective="use_all", snapshot_every=0)
    controller = Controller(cfg, group=fresh_pool, progress=False)
    marks: dict = {}

    def act(transition):  # runs on the controller's thread, between steps
        if not isinstance(transition.next, Running):
            return
        step, group = controller.step, controller.group
        if step == SLOW_AT and "slow" not in marks:
            # Several deadline windows long however slow the machine is: the window is the larger of the floor
            # and twice the slowest recent step, so the slow step is made longer than three of those.
            window = max(cfg.runtime.deadline_floor_s,
                         cfg.runtime.deadline_factor * max(h.seconds for h in controller.history))
            marks["slow_s"] = max(SLOW_S, 3 * window)
            group.run({w: SlowNextStep(marks["slow_s"]) for w in group.placement.workers})
            marks["slow"] = step
        elif step == STOP_AT and "stopped" not in marks:
            victim = group.placement.workers[1]
            marks["stopped"], marks["pid"], marks["at"] = victim, group.pid(victim), time.perf_counter()
            os.kill(marks["pid"], signal.SIGSTOP)

    controller.listeners.append(act)
    try:
        result = controller.run()
    finally:
        controller.shutdown()
        if "pid" in marks:  # a stopped process that survived would never exit by itself
            with contextlib.suppress(ProcessLookupError):
                os.kill(marks["pid"], signal.SIGKILL)
    slow = next(h for h in result.history if h.step == SLOW_AT)
    typical = sorted(h.seconds for h in result.history if h.step < SLOW_AT)[SLOW_AT // 2]
    assert slow.seconds >= marks["slow_s"]  # the slow batch made it several deadline windows long ...
    failures = [e for e in result.events if e["kind"] == "failure"]
    assert len(failures) == 1 and f"worker(s) [{marks['stopped']}]" in failures[0]["text"]  # ... and it was no hang
    assert "hung: no answer to a liveness probe" in failures[0]["text"]
    noticed = controller.journal.started + failures[0]["time"] - marks["at"]
    print(f"\nstopped worker noticed {noticed:.1f} s after SIGSTOP; steady step {typical * 1000:.0f} ms")
    assert [r["how"] for r in result.recoveries] == ["replicas"] and result.recoveries[0]["steps_lost"] == 0
    helpers.assert_exactly_once(result.history, cfg.train.steps, cfg.train.global_batch, cfg.data.num_samples)
    err, name = worst_state_err(result.tensors, train_reference(cfg).tensors)
    assert err <= 1e-9, f"{name}: {err:.2e}"
