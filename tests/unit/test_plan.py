"""The reshard planner and round scheduler: property tests, no processes."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic.core.boxes import box_numel, intersect
from elastic.core.config import ModelConfig
from elastic.core.layout import Layout, Placement
from elastic.model.llama import tensor_specs
from elastic.plan.memory_rounds import memory_bounded_rounds
from elastic.plan.planner import MissingShards, cached_plan, make_plan

MODEL = ModelConfig(dim=24, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=36, vocab_size=21)
SPECS = tuple(tensor_specs(MODEL))
BATCH = 12


@st.composite
def placements(draw, worker_pool=range(10)):
    while True:
        layout = Layout(draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 3])),
                        draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2, 3])))
        if layout.world <= 8 and layout.is_valid(MODEL, BATCH):
            break
    workers = draw(st.permutations(list(worker_pool)))[: layout.world]
    return Placement(layout, tuple(workers))


def held(placement, worker, spec):
    rank = placement.rank_of(worker)
    return None if rank is None else placement.box(spec, rank, MODEL.n_layers)


@settings(max_examples=80, deadline=None)
@given(placements(), placements(), st.sampled_from([4, 64, 1 << 20]))
def test_every_new_box_is_covered_exactly_once_and_locally_when_possible(old, new, chunk):
    plan = make_plan(old, new, SPECS, MODEL.n_layers, 8, chunk_bytes=chunk)
    by_target = {}
    for t in plan.transfers:
        by_target.setdefault((t.dst, t.tensor), []).append(t)
        spec = next(s for s in SPECS if s.name == t.tensor)
        src_box = held(old, t.src, spec)
        assert src_box is not None and intersect(src_box, t.box) == t.box  # the source holds the piece
        if not t.local:
            mine = held(old, t.dst, spec)
            assert mine is None or intersect(mine, t.box) is None  # a local copy could not have served it
            # Over the chunk size only as a single row: pieces are cut along their first dimension, never within a row.
            assert t.nbytes <= chunk or t.box[0][1] - t.box[0][0] == 1
    for spec in SPECS:
        for dst, new_box in new.holders(spec, MODEL.n_layers):
            pieces = [t.box for t in by_target.get((dst, spec.name), [])]
            assert sum(box_numel(b) for b in pieces) == box_numel(new_box)
            for a, b in itertools.combinations(pieces, 2):
                assert intersect(a, b) is None
            assert all(intersect(p, new_box) == p for p in pieces)


@settings(max_examples=40, deadline=None)
@given(placements())
def test_same_placement_moves_nothing(p):
    plan = make_plan(p, p, SPECS, MODEL.n_layers, 4)
    assert plan.bytes_moved() == 0 and plan.transfers and all(t.local for t in plan.transfers)


def test_replicas_share_the_sending():
    old = Placement(Layout(dp=4), (0, 1, 2, 3))
    new = Placement(Layout(fsdp=4), (4, 5, 6, 7))
    sent = {w: s for w, (s, _) in make_plan(old, new, SPECS, MODEL.n_layers, 4).bytes_by_worker().items() if s}
    assert set(sent) == {0, 1, 2, 3} and max(sent.values()) <= 1.1 * min(sent.values())


def test_missing_shards_are_named():
    old = Placement(Layout(fsdp=2), (0, 1))
    new = Placement(Layout(dp=2), (0, 2))
    with pytest.raises(MissingShards, match="held by no live worker"):
        make_plan(old, new, SPECS, MODEL.n_layers, 4, alive=frozenset({0}))
    replicated = Placement(Layout(dp=2), (0, 1))
    plan = make_plan(replicated, new, SPECS, MODEL.n_layers, 4, alive=frozenset({0}))
    assert {t.src for t in plan.transfers} == {0}


def test_plans_are_cached_per_transition():
    a, b = Placement(Layout(dp=2), (0, 1)), Placement(Layout(tp=2), (1, 0))
    assert cached_plan(a, b, SPECS, MODEL.n_layers, 4) is cached_plan(a, b, SPECS, MODEL.n_layers, 4)


@settings(max_examples=60, deadline=None)
@given(placements(), placements(), st.integers(16, 4096))
def test_rounds_deliver_every_remote_transfer_once_within_budget(old, new, budget):
    plan = make_plan(old, new, SPECS, MODEL.n_layers, 4, chunk_bytes=budget)
    rounds = memory_bounded_rounds(plan.transfers, budget)
    flat = [i for r in rounds for i in r]
    assert sorted(flat) == [i for i, t in enumerate(plan.transfers) if not t.local]
    for r in rounds:
        load, count = {}, {}
        for i in r:
            t = plan.transfers[i]
            for w in (t.src, t.dst):
                load[w] = load.get(w, 0) + t.nbytes
                count[w] = count.get(w, 0) + 1
        # within budget, unless the worker's only message this round is one bigger than the budget
        assert all(load[w] <= budget or count[w] == 1 for w in load)



def test_frozen_pieces_read_from_disk_leave_the_rounds_and_the_movers():
    from elastic.core.config import LoraConfig
    from elastic.model.specs import param_specs, training_specs
    from elastic.plan.memory_rounds import DISK, transfer_work
    from elastic.plan.planner import cached_plan
    from tests.helpers import tiny_config

    cfg = tiny_config().replace(lora=LoraConfig(r=4, alpha=8.0))
    frozen = frozenset(s.name for s in param_specs(cfg) if not s.trainable)
    old = Placement(Layout(tp=2), (0, 1))
    new = Placement(Layout(tp=2), (1, 0))  # the ranks swap workers: every piece travels
    plan = cached_plan(old, new, tuple(training_specs(cfg)), cfg.model.n_layers, 8)
    work = transfer_work(plan, 1 << 20, frozen)
    for w in (0, 1):
        disk = [t for r, _, t in work.of(w) if r == DISK]
        assert disk and all(t.tensor in frozen and t.dst == w for t in disk)  # read by the destination only
        assert all(t.tensor not in frozen for r, _, t in work.of(w) if r >= 0)  # no frozen piece in a round
    assert sum(t.nbytes for w in (0, 1) for r, _, t in work.of(w) if r == DISK) == sum(
        t.nbytes for t in plan.remote if t.tensor in frozen)
    assert transfer_work(plan, 1 << 20).movers == (0, 1) == work.movers  # the adapters still travel
