"""Whole-job restarts from layout-independent checkpoints: save under one layout, resume under another."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from elastic.control.controller import Controller
from elastic.control.run import with_control
from elastic.core import checkpoint as ckpt
from elastic.core.layout import Layout
from tests.helpers import tiny_config, worst_state_err
from tests.reference import cached_reference


@pytest.mark.timeout(300)
def test_a_loss_with_no_replica_and_no_snapshot_recovers_from_the_disk_checkpoint(fresh_pool, tmp_path):
    """fsdp=4 (no replica), snapshots off, a checkpoint every 3 steps: a worker killed after step 5 leaves only the
    checkpoint of step 3, which the recovery loads (through the same reshard path) before replaying two steps."""
    from elastic.control.states import Running
    from tests.helpers import assert_exactly_once

    cfg = tiny_config(steps=8)
    ref = cached_reference(cfg).tensors
    cfg = with_control(cfg, layout="fsdp=4", snapshot_every=0, checkpoint_dir=str(tmp_path), checkpoint_every=3)
    controller = Controller(cfg, group=fresh_pool, progress=False)
    killed = []

    def kill_after_step_5(transition):  # once the step-3 checkpoint (written in the background) is complete
        if not killed and 5 <= controller.step < 6 and isinstance(transition.next, Running) \
                and ckpt.latest(tmp_path) is not None:
            killed.append((controller.group.placement.workers[2], controller.step))
            controller.group.kill(killed[0][0])

    controller.listeners.append(kill_after_step_5)
    try:
        result = controller.run()
    finally:
        controller.shutdown()
    assert killed and [(r["how"], r["steps_lost"]) for r in result.recoveries] == [("checkpoint of step 3", 2)]
    err, name = worst_state_err(result.tensors, ref)
    assert err <= 1e-9, f"{name}: {err:.2e}"
    assert_exactly_once(result.history, cfg.train.steps, cfg.train.global_batch, cfg.data.num_samples)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("saved, resumed, workers", [("dp=2,tp=2", "fsdp=3", 4), ("fsdp=2,pp=2,mb=2", "tp=2", 4)])
def test_save_in_one_layout_resume_in_another_equals_uninterrupted(fresh_pool, tmp_path, saved, resumed, workers):
    cfg = tiny_config(steps=8)
    cfg = cfg.replace(runtime=dataclasses.replace(cfg.runtime, workers=workers))
    ref = cached_reference(cfg).tensors
    first = Controller(with_control(cfg, layout=saved, checkpoint_dir=str(tmp_path), checkpoint_every=4),
                       group=fresh_pool, progress=False, gather_tensors=False)
    try:
        first.start()
        while first.step < 4 or not list(tmp_path.glob("step_000004")):
            first.tick()
    finally:
        first.shutdown()  # the job goes away (its workers keep no engine or shards): only the disk checkpoint remains
    assert ckpt.latest(tmp_path).name == "step_000004"
    second = Controller(with_control(cfg, layout=resumed, resume=str(tmp_path)), group=fresh_pool, progress=False)
    try:
        result = second.run()
    finally:
        second.shutdown()
    assert [h.step for h in result.history] == [4, 5, 6, 7]
    assert any(e["kind"] == "resume" for e in result.events)
    err, name = worst_state_err(result.tensors, ref)
    assert err <= 1e-9, f"{name}: {err:.2e}"


def test_a_bad_checkpoint_is_refused_before_any_worker_starts(ray_session, tmp_path):
    cfg = tiny_config(steps=8)
    (tmp_path / "latest").write_text("step_000004")
    (tmp_path / "step_000004").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="manifest missing"):
        Controller(with_control(cfg, resume=str(tmp_path)))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("saved, loaded", [("dp=2,tp=2", "fsdp=3"), ("fsdp=2,pp=2,mb=2", "tp=2")])
def test_dcp_checkpoints_reshard_across_layouts_bit_for_bit(pool, tmp_path, saved, loaded):
    """torch.distributed.checkpoint, as the checkpoint-restart baselines use it: save in one layout, load into
    empty engines of another, and every training tensor comes back exactly."""
    from elastic.core.layout import Placement
    from elastic.runtime.dcp import DcpLoad, DcpSave

    pool.cfg = tiny_config(steps=8)
    old, new = Layout.parse(saved), Layout.parse(loaded)
    pool.setup(Placement(old, tuple(pool.warm()[: old.world])))
    for _ in range(2):
        pool.step()
    _, before = pool.gather_tensors()
    pool.run({w: DcpSave(str(tmp_path)) for w in pool.placement.workers})
    pool.setup(Placement(new, tuple(pool.warm()[: new.world])), step=2, empty=True)
    assert set(pool.run({w: DcpLoad(str(tmp_path)) for w in pool.placement.workers}).values()) == {2}
    step, after = pool.gather_tensors()
    assert step == 2 and set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    trained = pool.step()  # and it trains on, at step 2, from the loaded state
    assert {r.step for r in trained.values()} == {2} and pool.committed == 3
