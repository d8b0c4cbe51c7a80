"""LoRA under every layout and across live reshards equals the single-process LoRA run (float64).

Adapters shard with their base layer (column-parallel base: A replicated, B split on its output;
row-parallel: A split on its input, B replicated); the frozen base moves as parameters with no
optimizer state. With ``lora.dropout`` the masks are seeded per (step, sample, module), so tp (the
row-parallel adapters' inputs split on their features), fsdp (the batch split) and pp (the batch cut
into chunks) draw exactly the single-process run's masks; the reference draws them by the same rule,
written again (``tests/reference.SeededDropout``). Across reshards, a worker is also SIGKILLed mid-step
(inside the clip all-reduce, on a layout with no replica): the recovery still ends at the reference, with
every sample used once. Under mixed precision the frozen base's matmul weights are stored in bf16, which is
bit-for-bit the run that stores them in float32, across the same moves (the base from the folder and from peers).
"""

from __future__ import annotations

import dataclasses
import threading

import pytest

from elastic.control.controller import Controller
from elastic.control.events import AddWorkers, Drain, Relayout
from elastic.control.run import with_control
from elastic.control.sources import ScriptedEvents
from elastic.control.states import Running
from elastic.core.config import LoraConfig
from elastic.core.layout import Layout, Placement
from tests.helpers import (
    StallBeforeClip,
    WaitForWorkers,
    assert_exactly_once,
    rel_err,
    tiny_config,
    worst_state_err,
)
from tests.reference import cached_reference

STEPS = 8


def lora_config(steps=STEPS, dropout=0.0, **kw):
    return tiny_config(steps=steps, **kw).replace(lora=LoraConfig(r=4, alpha=8.0, dropout=dropout))


@pytest.fixture(scope="module")
def lora_references():
    """The reference run per dropout rate, computed once for the module."""
    runs = {}

    def get(dropout: float):
        if dropout not in runs:
            cfg = lora_config(dropout=dropout)
            ref = cached_reference(cfg)
            runs[dropout] = cfg, ref.losses, ref.tensors
        return runs[dropout]

    return get


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("layout_text", "dropout"), [
    ("dp=2", 0.0), ("tp=2", 0.0), ("fsdp=2", 0.0), ("pp=2,mb=2", 0.0), ("fsdp=2,tp=2", 0.0),
    ("tp=2", 0.3), ("fsdp=2", 0.3), ("pp=2,mb=2", 0.3)])
def test_lora_layout_matches_single_process(pool, lora_references, layout_text, dropout):
    cfg, _, ref = lora_references(dropout)
    if dropout:  # the masks change the run: a dropout that did nothing would pass without this
        err, name = worst_state_err(lora_references(0.0)[2], ref)
        assert err > 1e-3, f"dropout {dropout} left the run unchanged ({name} {err:.2e})"
    pool.cfg = cfg
    layout = Layout.parse(layout_text)
    pool.setup(Placement(layout, tuple(pool.warm()[: layout.world])))
    for _ in range(STEPS):
        pool.step()
    step, state = pool.gather_tensors()
    err, name = worst_state_err(state, ref)
    assert err <= 1e-9, f"{layout}: {name} {err:.2e}"
    # Only adapters trained: the frozen base is bit-identical to its initial value, and it has no
    # optimizer state; the adapters moved.
    initial = cached_reference(cfg, steps=0).tensors
    assert set(state) == set(initial)
    assert all(k.count("lora_") or "::" not in k for k in state)
    base = "model.layers.0.self_attn.q_proj.weight"
    assert (state[base] == initial[base]).all() and f"{base}::exp_avg" not in state
    for name in ("model.layers.0.self_attn.q_proj.lora_B.weight", "model.layers.1.mlp.down_proj.lora_A.weight"):
        assert rel_err(state[name], initial[name]) > 1e-4, f"{name} did not train"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lora_across_live_reshards(fresh_pool):
    cfg = lora_config(steps=12, ahead=True)
    ref = cached_reference(cfg).tensors
    script = ScriptedEvents({3: [Drain(reason="preempted", worker=fresh_pool.warm()[0])],
                             6: [AddWorkers(reason="back", count=1)],
                             9: [Relayout(reason="operator", layout=Layout(fsdp=2, tp=2))]})
    group = fresh_pool
    cfg = with_control(cfg, layout=Layout(tp=2, dp=2), objective="use_all")
    controller = Controller(cfg, group=group, sources=[script, WaitForWorkers(group)], progress=False)
    killed = []

    def kill_mid_step(transition):
        """In step 10, on fsdp=2,tp=2 (no replica): the victim stalls before its clip all-reduce, its peers wait
        inside that collective, and it is SIGKILLed there."""
        placement = controller.group.placement
        if killed or controller.step != 10 or not isinstance(transition.next, Running) or placement is None:
            return
        victim = placement.workers[1]
        controller.group.run({victim: StallBeforeClip(3.0)})
        killed.append(victim)
        threading.Timer(1.0, controller.group.kill, args=(victim,)).start()

    controller.listeners.append(kill_mid_step)
    try:
        result = controller.run()
    finally:
        controller.shutdown()
    assert killed and len(result.recoveries) == 1, result.recoveries
    assert len(result.reshards) >= 3
    err, name = worst_state_err(result.tensors, ref)
    assert err <= 1e-9, f"{name}: {err:.2e}"
    assert_exactly_once(result.history, cfg.train.steps, cfg.train.global_batch, cfg.data.num_samples)


@pytest.mark.timeout(300)
def test_lora_reshard_reads_the_frozen_base_from_its_folder(pool, tmp_path):
    """The base's pieces come from the --base folder instead of a peer; the run still equals the reference.
    Then under mixed precision: the base stored in bf16 equals the run storing it in float32 (``mixed_lora_pair``)."""
    from elastic.driver.resharder import frozen_from_disk, plan_move, reshard
    from elastic.model.hf import save_hf_model

    plain = lora_config(steps=4)
    start = cached_reference(plain, steps=0).tensors
    folder = save_hf_model(tmp_path / "base", plain.model, {k: v for k, v in start.items()
                                                            if "::" not in k and "lora_" not in k})
    cfg = plain.replace(train=dataclasses.replace(plain.train, init_from=str(folder)),
                        runtime=dataclasses.replace(plain.runtime, base_from="disk"))
    ref = cached_reference(cfg).tensors
    pool.cfg = cfg
    workers = tuple(pool.warm()[:4])
    pool.setup(Placement(Layout(dp=2, tp=2), workers))
    pool.step()
    disk = frozen_from_disk(cfg)
    plan = plan_move(pool, Placement(Layout(fsdp=2, pp=2, microbatches=2), workers[::-1]))
    assert disk and any(t.tensor in disk for t in plan.remote), "the move sends no base piece: nothing to read"
    report = reshard(pool, plan, pool.committed, "base from disk", disk)
    base_bytes = sum(t.nbytes for t in plan.remote if t.tensor in disk)
    assert report.bytes_read == base_bytes and report.bytes_moved == plan.bytes_moved() - base_bytes
    while pool.committed < cfg.train.steps:
        pool.step()
    _, state = pool.gather_tensors()
    err, name = worst_state_err(state, ref)
    assert err <= 1e-9, f"{name}: {err:.2e}"
    # The same moves under mixed precision, with the frozen base stored in bf16: bit for bit the float32 one's.
    bf16 = {k: v.bfloat16() for k, v in start.items() if "::" not in k and "lora_" not in k}
    mixed_lora_pair(pool, save_hf_model(tmp_path / "bf16", plain.model, bf16))


def _fsdp_tp_then_dp_pp(pool, cfg, steps: int) -> tuple[list[float], dict]:
    """``steps`` steps, half on fsdp=2 x tp=2, then a live reshard (the frozen base from the folder as
    ``runtime.base_from`` says) to dp=2 x pp=2 on the workers reversed; the losses and the gathered state."""
    from elastic.driver.resharder import frozen_from_disk, plan_move, reshard
    from elastic.driver.summary import summarize

    pool.cfg = cfg
    workers = tuple(pool.warm()[:4])
    first, second = Placement(Layout(fsdp=2, tp=2), workers), Placement(Layout(dp=2, pp=2, microbatches=2),
                                                                       workers[::-1])
    pool.setup(first)
    losses = [summarize(pool.step(), first, 0.0).loss for _ in range(steps // 2)]
    reshard(pool, plan_move(pool, second), pool.committed, "fsdp x tp -> dp x pp", frozen_from_disk(cfg))
    losses += [summarize(pool.step(), second, 0.0).loss for _ in range(steps - steps // 2)]
    return losses, pool.gather_tensors()[1]


def mixed_lora_pair(pool, folder) -> None:
    """Mixed precision over a bf16 base folder (as real bases are): the frozen base stored in bf16 (read from
    the folder by the reshard, then moved between peers) equals the run storing it in float32, bit for bit."""
    import torch

    from elastic.model.specs import param_specs, stored_in_bf16

    plain = lora_config(steps=2, dtype="float32")
    train = dataclasses.replace(plain.train, mixed_precision="bf16", init_from=str(folder))
    runs = {}
    for frozen_bf16, base_from in ((True, "disk"), (True, "peer"), (False, "peer")):
        cfg = plain.replace(train=dataclasses.replace(train, frozen_bf16=frozen_bf16),
                            runtime=dataclasses.replace(plain.runtime, base_from=base_from))
        assert any(stored_in_bf16(cfg, s) for s in param_specs(cfg)) == frozen_bf16
        runs[frozen_bf16, base_from] = _fsdp_tp_then_dp_pp(pool, cfg, 2)
    losses, state = runs[False, "peer"]
    assert {t.dtype for t in state.values()} == {torch.float32}
    for key, (got_losses, got) in runs.items():
        assert got_losses == losses, f"{key}: {got_losses} != {losses}"
        assert set(got) == set(state)
        assert all(torch.equal(got[k], state[k]) for k in state), f"{key}: " + str(
            [k for k in state if not torch.equal(got[k], state[k])][:3])
