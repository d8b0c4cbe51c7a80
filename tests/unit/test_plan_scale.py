"""The planner at cluster scale and the stream-bounded round scheduler: property tests, no processes.

The compact planner is checked against the original pairwise one (every new box against every old
box, one tensor at a time), its statistics against the message list they summarise, the water-fill
against one-at-a-time greedy, and the round scheduler against its invariants. One test plans a 70B
model on 1,024 simulated workers.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic.core.boxes import box_numel, intersect
from elastic.core.layout import Layout, Placement, box_grid, grid_index, stage_table
from elastic.model.llama import tensor_specs
from elastic.plan.planner import ItemSizes, MissingShards, Transfer, cached_plan, make_plan, water_fill
from elastic.plan.stream_rounds import (
    link_seconds,
    lower_bound,
    schedule,
    scheduled_seconds,
    transfer_rounds,
)
from tests.unit.test_plan import BATCH, MODEL, placements  # noqa: F401 (shared strategies)

PARAMS = tensor_specs(MODEL)
SPECS = tuple(PARAMS + [p.renamed(f"{p.name}::{k}") for p in PARAMS for k in ("exp_avg", "exp_avg_sq")])
SIZES = ItemSizes.adamw()


def reference(old, new, specs, itemsize, alive=None):
    """The original planner: every new box against every distinct old box, one tensor at a time."""
    out, missing = [], set()
    for spec in specs:
        replicas = defaultdict(list)
        for worker, box in old.holders(spec, MODEL.n_layers):
            if alive is None or worker in alive:
                replicas[box].append(worker)
        for dst, new_box in new.holders(spec, MODEL.n_layers):
            covered = 0
            for old_box, holders in replicas.items():
                piece = intersect(new_box, old_box)
                if piece is not None:
                    covered += box_numel(piece)
                    out.append((spec.name, dst in holders, dst, piece, box_numel(piece) * itemsize(spec)))
            if covered != box_numel(new_box):
                missing.add(spec.name)
    return out, missing


@settings(max_examples=50, deadline=None)
@given(st.builds(Layout, st.sampled_from([1, 2, 3]), st.sampled_from([1, 2, 3, 4]), st.sampled_from([1, 2]),
                 st.sampled_from([1, 2, 3])))
def test_box_grid_agrees_with_placement_box(layout):
    placement = Placement(layout, tuple(range(layout.world)))
    table = stage_table(layout, MODEL.n_layers)
    for spec in PARAMS:
        stage = layout.stage_of(spec, MODEL.n_layers)
        assert spec.owner != "layer" or table[spec.layer] == stage
        grid = box_grid(layout, spec.shape, spec.tp_dim)
        for rank in range(layout.world):
            c = layout.coord(rank)
            want = placement.box(spec, rank, MODEL.n_layers)
            assert want == (grid[grid_index(layout, c, spec.tp_dim)] if c.pp == stage else None)


@settings(max_examples=80, deadline=None)
@given(placements(), placements(), st.data())
def test_plan_agrees_with_the_pairwise_reference(old, new, data):
    alive = data.draw(st.one_of(st.none(), st.sets(st.sampled_from(old.workers)).map(frozenset)))
    want, lost = reference(old, new, SPECS, SIZES, alive)
    if lost:
        with pytest.raises(MissingShards) as info:
            make_plan(old, new, SPECS, MODEL.n_layers, SIZES, alive, chunk_bytes=1 << 40)
        assert set(info.value.missing) == lost
        return
    plan = make_plan(old, new, SPECS, MODEL.n_layers, SIZES, alive, chunk_bytes=1 << 40)
    got = [(t.tensor, t.local, t.dst, t.box, t.nbytes) for t in plan.transfers]
    assert Counter(got) == Counter(want)  # same pieces, copied locally in exactly the same cases
    for t in plan.remote:
        assert alive is None or t.src in alive
    received = defaultdict(int)
    for _name, local, dst, _, nbytes in want:
        if not local:
            received[dst] += nbytes
    assert {w: r for w, (_, r) in plan.bytes_by_worker().items() if r} == dict(received)


@settings(max_examples=60, deadline=None)
@given(placements(), placements(), st.sampled_from([4, 64, 1 << 20]))
def test_statistics_match_the_message_list(old, new, chunk):
    plan = make_plan(old, new, SPECS, MODEL.n_layers, SIZES, chunk_bytes=chunk)
    transfers = plan.transfers
    remote = [t for t in transfers if not t.local]
    assert plan.counts() == (len(remote), len(transfers) - len(remote))
    assert plan.bytes_moved() == sum(t.nbytes for t in remote)
    assert plan.bytes_copied() == sum(t.nbytes for t in transfers if t.local)
    by_worker = defaultdict(lambda: [0, 0])
    flows = defaultdict(int)
    for t in remote:
        by_worker[t.src][0] += t.nbytes
        by_worker[t.dst][1] += t.nbytes
        flows[t.src, t.dst] += t.nbytes
    assert plan.bytes_by_worker() == {w: tuple(v) for w, v in by_worker.items()}
    src, dst, nbytes = plan.flows()
    assert dict(zip(zip(src.tolist(), dst.tolist(), strict=True), nbytes.tolist(), strict=True)) == dict(flows)
    for w in new.workers:
        assert plan.for_worker(w) == [(i, t) for i, t in enumerate(transfers) if w in (t.src, t.dst)]


def test_moments_are_sized_apart_from_weights_and_cached():
    old, new = Placement(Layout(tp=2), (0, 1)), Placement(Layout(fsdp=2), (2, 3))
    plan = cached_plan(old, new, SPECS, MODEL.n_layers, ItemSizes.adamw())
    assert plan is cached_plan(old, new, SPECS, MODEL.n_layers, ItemSizes.adamw())
    for t in plan.transfers:
        assert t.nbytes == box_numel(t.box) * (4 if "::" in t.tensor else 2)
    assert plan.bytes_moved() == sum(s.numel * SIZES(s) for s in SPECS)  # fresh workers receive everything


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=8), st.integers(1, 7), st.integers(0, 40))
def test_water_fill_equals_one_request_at_a_time(loads, unit, k):
    heap = [(load, h) for h, load in enumerate(loads)]
    heapq.heapify(heap)
    counts = [0] * len(loads)
    for _ in range(k):
        load, h = heapq.heappop(heap)
        counts[h] += 1
        heapq.heappush(heap, (load + unit, h))
    assert water_fill(loads, unit, k) == counts


def check_rounds(src, dst, rounds, streams):
    for r in set(rounds.tolist()):
        mine = rounds == r
        assert max(Counter(src[mine].tolist()).values()) <= streams
        assert max(Counter(dst[mine].tolist()).values()) <= streams


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9), st.integers(1, 1000)), min_size=1, max_size=80)
       .map(lambda edges: [e for e in edges if e[0] != e[1]]).filter(bool), st.integers(1, 3))
def test_rounds_respect_streams_and_stay_near_the_lower_bound(edges, streams):
    src, dst, nbytes = (np.array(column) for column in zip(*edges, strict=True))
    rounds = schedule(src, dst, nbytes, streams)
    check_rounds(src, dst, rounds, streams)
    bound = lower_bound(src, dst, streams)
    assert bound <= rounds.max() + 1 <= 2 * bound - 1  # first fit: each end blocks at most bound - 1 rounds
    assert scheduled_seconds(src, dst, nbytes, rounds, 1e3) >= link_seconds(src, dst, nbytes, 1e3) - 1e-9


@settings(max_examples=60, deadline=None)
@given(placements(), placements(), st.integers(1, 3), st.sampled_from([16, 1 << 20]))
def test_plan_rounds_deliver_every_byte_exactly_once(old, new, streams, chunk):
    plan = make_plan(old, new, SPECS, MODEL.n_layers, SIZES, chunk_bytes=chunk)
    rounds = transfer_rounds(plan.transfers, streams)
    flat = [i for r in rounds for i in r]
    assert sorted(flat) == [i for i, t in enumerate(plan.transfers) if not t.local]
    delivered: dict[tuple[int, str], list] = defaultdict(list)
    for t in [plan.transfers[i] for i in flat] + [t for t in plan.transfers if t.local]:
        delivered[t.dst, t.tensor].append(t.box)
    for spec in SPECS:
        for dst, box in new.holders(spec, MODEL.n_layers):
            pieces = delivered.pop((dst, spec.name), [])
            assert sum(box_numel(b) for b in pieces) == box_numel(box)  # covered ...
            assert all(intersect(a, b) is None for a, b in itertools.combinations(pieces, 2))  # ... once
    assert not delivered
    if flat:
        src = np.array([plan.transfers[i].src for i in flat])
        dst = np.array([plan.transfers[i].dst for i in flat])
        check_rounds(src, dst, np.array([r for r, idx in enumerate(rounds) for _ in idx]), streams)
        assert len(rounds) <= 2 * lower_bound(src, dst, streams)
    with pytest.raises(ValueError, match="max_streams"):
        schedule([0], [1], [1], 0)


def test_transfer_is_still_the_message_type():
    t = Transfer("w", 1, 1, ((0, 2),), 8)
    assert t.local and not Transfer("w", 1, 2, ((0, 2),), 8).local
