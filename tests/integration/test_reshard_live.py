"""Live reconfiguration: equivalence across reshards, round trips, pauses, refusals and failed reshards."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from elastic.control.controller import Controller
from elastic.control.events import AddWorkers, Drain, Relayout
from elastic.control.run import with_control
from elastic.control.sources import ScriptedEvents
from elastic.control.states import Launching, Paused, Running
from elastic.core.data import build_dataset
from elastic.core.layout import Layout, Placement
from elastic.driver.ray_group import RayWorkerGroup
from elastic.driver.resharder import plan_move, reshard
from tests import helpers
from tests.helpers import DelayTransfers, WaitForWorkers, tiny_config, worst_state_err
from tests.reference import cached_reference


def assert_exactly_once(cfg, history):
    """Every step's reported samples, each index once per epoch (see tests.helpers.assert_exactly_once)."""
    n = len(build_dataset(cfg.data, cfg.train.seed))
    helpers.assert_exactly_once(history, cfg.train.steps, cfg.train.global_batch, n)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_drain_add_relayout_and_back_equals_single_process(fresh_pool, tmp_path):
    # 45 training windows and 8 per step: the run crosses two epoch boundaries, both inside a step.
    cfg = tiny_config(steps=15, ahead=True)
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, max_corpus_bytes=46 * 16 + 1))
    # events come every 3 steps, and a tiny model's step is shorter than a skeleton build
    cfg = with_control(cfg, prepare_wait_steps=1)
    assert len(build_dataset(cfg.data, cfg.train.seed)) == 45
    ref_state = cached_reference(cfg).tensors
    script = ScriptedEvents({
        3: [Drain(reason="preemption notice", worker=fresh_pool.warm()[1])],           # 4 -> 3 workers
        6: [AddWorkers(reason="two nodes back", count=2)],          # 3 -> 5 workers
        9: [Relayout(reason="operator", layout=Layout(fsdp=5))],    # dp=5 -> fsdp=5
        12: [Relayout(reason="operator", layout=Layout(dp=2, tp=2))],  # back to 4 workers
    })
    group = fresh_pool
    cfg = with_control(cfg, layout=Layout(dp=2, tp=2), objective="use_all")
    controller = Controller(cfg, group=group, sources=[script, WaitForWorkers(group)], progress=False,
                            run_dir=str(tmp_path / "run"))
    try:
        controller.start()
        pids = {w: controller.group.pid(w) for w in controller.group.warm()}
        result = controller.run_started()
        survivors = [w for w in pids if w in controller.group.live()]
        assert survivors and all(controller.group.pid(w) == pids[w] for w in survivors)  # never restarted
    finally:
        controller.shutdown()
    layouts = [h.layout for h in result.history]
    # Each move waits for its skeleton, built while training goes on (a step or two here), so a layout
    # starts at or a little after the step its event arrives at; the two added workers warm up during
    # step 6 (WaitForWorkers).
    runs = [layouts[0]] + [b for a, b in zip(layouts, layouts[1:], strict=False) if a != b]
    assert runs == ["dp=2,tp=2", "dp=3", "dp=5", "fsdp=5", "dp=2,tp=2"], layouts
    starts = [i for i in range(1, len(layouts)) if layouts[i] != layouts[i - 1]]
    wait = cfg.section("control").prepare_wait_steps
    assert all(0 <= s - arrived <= wait for s, arrived in zip(starts, (3, 7, 9, 12), strict=True)), layouts
    # One live reshard per change of layout, in order, each at the step its layout starts (how long each
    # took is bench/reshard.py's question).
    assert [(r.old, r.new) for r in result.reshards] == list(zip(runs, runs[1:], strict=False)), result.reshards
    assert [r.step for r in result.reshards] == starts
    err, name = worst_state_err(result.tensors, ref_state)
    assert err <= 1e-9, f"{name}: {err:.2e}"
    assert_exactly_once(cfg, result.history)
    # The run's metrics, and its PNG timeline.
    from matplotlib.image import imread

    from elastic.tools.metrics import read_run
    from elastic.tools.plot import plot_run

    steps, events = read_run(tmp_path / "run")
    assert [s["step"] for s in steps] == list(range(15)) and sum(e["kind"] == "reshard" for e in events) == 4
    png = plot_run(tmp_path / "run")
    image = imread(png)
    assert png.stat().st_size > 30_000 and image.shape[0] > 600 and image.shape[1] > 900
    assert image[..., :3].std() > 0.05  # not a blank canvas


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pack_bytes", [0, 1 << 20], ids=["every piece alone", "small pieces packed"])
def test_round_trip_is_bit_identical(pool, pack_bytes):
    cfg = tiny_config(steps=3, dtype="float32")
    cfg = cfg.replace(runtime=dataclasses.replace(cfg.runtime, reshard_pack_bytes=pack_bytes))
    pool.cfg = cfg
    workers = tuple(pool.warm()[:4])
    a = Placement(Layout(dp=2, tp=2), workers)
    pool.setup(a)
    for _ in range(2):
        pool.step()
    _, before = pool.gather_tensors()
    for target in (Placement(Layout(fsdp=2, pp=2, microbatches=2), workers[::-1]), a):
        reshard(pool, plan_move(pool, target), 2, "round trip")
        step, now = pool.gather_tensors()  # the intermediate placement holds the same tensors too
        assert step == 2 and pool.placement == target
        assert set(now) == set(before) and all(torch.equal(before[k], now[k]) for k in before)


@pytest.mark.timeout(180)
def test_too_few_workers_pauses_then_resumes(fresh_pool):
    """The pool's four workers on dp=4 with min_workers=4: a drain leaves three, the job pauses, and one
    replacement (the only worker this test starts) resumes it. The pool is left with four workers."""
    cfg = tiny_config(steps=8)
    ref_state = cached_reference(cfg).tensors
    group = fresh_pool
    assert len(group.warm()) == 4 and not group.starting  # fresh_pool trims: the budget arithmetic needs four
    script = ScriptedEvents({2: [Drain(reason="preempted", worker=group.warm()[0])]})

    class ReturnWhenPaused:
        """Capacity comes back only once the job has paused (as a replacement node would)."""

        fired = False

        def poll(self, step):
            if isinstance(controller.state, Paused) and not self.fired:
                self.fired = True
                return [AddWorkers(reason="replacement arrived", count=1)]
            return []

    cfg = with_control(cfg, layout=Layout(dp=4), min_workers=4, objective="use_all")
    controller = Controller(cfg, group=group, sources=[script, ReturnWhenPaused(), WaitForWorkers(group)],
                            progress=False)
    try:
        result = controller.run()
    finally:
        controller.shutdown()
    kinds = [e["kind"] for e in result.events]
    assert "pause" in kinds and kinds.index("pause") < kinds.index("reshard")
    pause = next(e for e in result.events if e["kind"] == "pause")
    assert "needs at least 4" in pause["text"]
    assert worst_state_err(result.tensors, ref_state)[0] <= 1e-9


@pytest.mark.timeout(180)
def test_failed_reshard_keeps_old_placement(ray_session, tmp_path):
    """A new worker dies in the middle of the transfer: the old placement carries on, nothing lost."""
    cfg = tiny_config(steps=6)
    ref_state = cached_reference(cfg).tensors
    cfg = cfg.replace(runtime=dataclasses.replace(cfg.runtime, workers=2))
    script = ScriptedEvents({2: [AddWorkers(reason="scale out", count=1)]})
    group = RayWorkerGroup(cfg)  # its own workers 0 and 1; the newcomer is worker 2
    cfg = with_control(cfg, layout=Layout(dp=2), objective="use_all")
    controller = Controller(cfg, group=group, sources=[script, WaitForWorkers(group)], progress=False)
    markers = [tmp_path / f"transfer-{w}" for w in (0, 1)]

    def kill_newcomer():
        """Once an old worker pauses inside its transfer, whose group (the newcomer in it) has formed: a kill
        there, not while the group forms, whatever the machine's load."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(m.exists() for m in markers) and 2 in controller.group.live():
                controller.group.kill(2)
                return
            time.sleep(0.01)

    def delay_transfers(transition):  # test-side fault injection, once the first placement runs
        if isinstance(transition.previous, Launching):
            controller.group.run({w: DelayTransfers(3.0, marker=str(markers[i]))
                                  for i, w in enumerate(controller.group.placement.workers)})

    controller.listeners.append(delay_transfers)
    killer = threading.Thread(target=kill_newcomer, daemon=True)
    killer.start()
    try:
        result = controller.run()
    finally:
        controller.shutdown()
        group.shutdown()
    kinds = [e["kind"] for e in result.events]
    assert "reshard failed" in kinds
    assert all(h.layout == "dp=2" for h in result.history)
    assert worst_state_err(result.tensors, ref_state)[0] <= 1e-9


@pytest.mark.timeout(120)
def test_operator_requests_through_the_named_actor(fresh_pool, capsys):
    from elastic.control.client import JobClient
    from launch.cli import main

    cfg = tiny_config(steps=400, dtype="float32")
    cfg = with_control(cfg, layout=Layout(dp=2), poll_interval_s=0.05)
    controller = Controller(cfg, group=fresh_pool, job_name="live-ops", progress=False, gather_tensors=False)
    answers = {}

    def operate():
        while not isinstance(controller.state, Running) or controller.step < 2:
            time.sleep(0.05)
        client = JobClient("live-ops", timeout_s=60)
        answers["bad"] = client.relayout("tp=3")
        answers["good"] = client.relayout("fsdp=2")
        answers["status"] = client.status()
        answers["cli_status"] = main(["events", "status", "--job", "live-ops"])
        answers["cli_refused"] = main(["events", "relayout", "pp=5", "--job", "live-ops"])
        answers["cli_missing"] = main(["events", "status", "--job", "no-such-job"])
        answers["stop"] = client.set_workers(1)

    thread = threading.Thread(target=operate, daemon=True)
    thread.start()
    try:
        controller.start()
        while thread.is_alive() and controller.step < 390:
            controller.tick()
    finally:
        controller.shutdown()
    assert answers["bad"].startswith("refused: layout tp=3: tp=3 does not divide n_heads=4")
    assert answers["good"].startswith("moved to fsdp=2") and "ms" in answers["good"]
    assert answers["status"]["layout"] == "fsdp=2" and answers["status"]["step"] >= 2
    assert "dp=1" in answers["stop"]
    out = capsys.readouterr()
    assert answers["cli_status"] == 0 and "job live-ops: running" in out.out and "layout fsdp=2" in out.out
    assert answers["cli_refused"] == 1 and "refused: layout pp=5: pp=5 exceeds n_layers=2" in out.out
    assert answers["cli_missing"] == 2 and "no running elastic job named 'no-such-job'" in out.err
    with pytest.raises(ValueError, match="no running elastic job named 'nope'"):
        JobClient("nope")
