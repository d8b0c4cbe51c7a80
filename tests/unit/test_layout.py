"""Layouts, placements and boxes: pure tests, no processes."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic.core.boxes import box_numel, chunk, intersect
from elastic.core.config import MODEL_PRESETS, ModelConfig
from elastic.core.layout import Layout, Placement, enumerate_layouts
from elastic.model.llama import tensor_specs

# With attention biases (Qwen2, Llama's attention_bias): q/k/v biases are split by tp, o_proj's is replicated.
MODEL = ModelConfig(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=60, vocab_size=37, qkv_bias=True,
                    o_bias=True)


def layouts(max_world: int = 12):
    degree = st.sampled_from([1, 2, 3])
    return st.builds(Layout, degree, degree, st.sampled_from([1, 2]), st.sampled_from([1, 2, 3]),
                     st.sampled_from([1, 2])).filter(lambda l: l.world <= max_world)


@given(layouts())
def test_rank_coordinates_round_trip(layout):
    seen = set()
    for rank in range(layout.world):
        c = layout.coord(rank)
        assert layout.rank(c) == rank
        seen.add((c.pp, c.dp, c.fsdp, c.tp))
    assert len(seen) == layout.world


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_each_replica_tiles_every_tensor_exactly_once(layout):
    """Within one dp replica (and one tp rank for tp-replicated tensors) boxes tile each tensor."""
    placement = Placement(layout, tuple(range(100, 100 + layout.world)))
    for spec in tensor_specs(MODEL):
        owner = layout.stage_of(spec, MODEL.n_layers)
        for dp in range(layout.dp):
            counts = {}
            for rank in range(layout.world):
                c = layout.coord(rank)
                box = placement.box(spec, rank, MODEL.n_layers)
                if c.pp != owner:
                    assert box is None
                    continue
                if c.dp != dp or (spec.tp_dim is None and c.tp != 0):
                    continue  # other dp replicas, and tp peers of a tensor tp replicates
                for idx in itertools.product(*(range(lo, hi) for lo, hi in box)):
                    counts[idx] = counts.get(idx, 0) + 1
            assert len(counts) == spec.numel and set(counts.values()) == {1}, spec.name


def test_dp_replicas_hold_equal_boxes():
    layout = Layout(dp=2, fsdp=2, tp=2)
    placement = Placement(layout, tuple(range(8)))
    spec = tensor_specs(MODEL)[1]
    for rank in range(8):
        c = layout.coord(rank)
        twin = layout.rank(type(c)(c.pp, 1 - c.dp, c.fsdp, c.tp))
        assert placement.box(spec, rank, 3) == placement.box(spec, twin, 3)


def test_chunk_matches_torch_chunk_semantics():
    import torch

    for n, parts in [(10, 4), (9, 4), (5, 4), (8, 2), (1, 3)]:
        pieces = torch.arange(n).chunk(parts)
        for i in range(parts):
            lo, hi = chunk(n, parts, i)
            expect = pieces[i].tolist() if i < len(pieces) else []
            assert list(range(lo, hi)) == expect


def test_intersection_and_numel():
    assert intersect(((0, 4), (0, 4)), ((2, 6), (1, 3))) == ((2, 4), (1, 3))
    assert intersect(((0, 2),), ((2, 4),)) is None
    assert box_numel(((0, 3), (1, 5))) == 12


@pytest.mark.parametrize("text, expect", [
    ("dp=2,tp=2", Layout(dp=2, tp=2)),
    ("fsdp=4", Layout(fsdp=4)),
    ("pp=2,dp=2,mb=4", Layout(dp=2, pp=2, microbatches=4)),
])
def test_parse_and_print(text, expect):
    assert Layout.parse(text) == expect
    assert Layout.parse(str(expect)) == expect


@pytest.mark.parametrize("text, words", [
    ("dp=2,tq=2", "malformed layout part 'tq=2'"), ("dp=two", "malformed"), ("", "empty layout"),
    ("dp=2,dp=3", "sets dp twice"), ("dp=0", "must be a positive integer"),
])
def test_parse_errors_name_the_problem(text, words):
    with pytest.raises(ValueError, match=words):
        Layout.parse(text)


def test_validation_shows_the_arithmetic():
    model = MODEL_PRESETS["tiny"]  # 4 heads, 2 kv heads, ffn 64, 2 layers
    with pytest.raises(ValueError, match=r"tp=3 does not divide n_heads=4 \(4 % 3 = 1\)"):
        Layout(tp=3).validate(model, 8)
    with pytest.raises(ValueError, match="tp=4 does not divide n_kv_heads=2"):
        Layout(tp=4).validate(model, 8)
    with pytest.raises(ValueError, match="pp=3 exceeds n_layers=2"):
        Layout(pp=3).validate(model, 8)
    with pytest.raises(ValueError, match=r"global_batch=4 is smaller than dp\*fsdp\*microbatches=2\*2\*2=8"):
        Layout(dp=2, fsdp=2, microbatches=2).validate(model, 4)
    with pytest.raises(ValueError, match=r"divisible by dp\*fsdp\*microbatches=6 \(8 % 6 = 2\)"):
        Layout(dp=3, pp=2, microbatches=2).validate(model, 8)
    Layout(dp=3).validate(model, 8)  # uneven data-parallel splits are fine without pp


def test_enumerate_layouts_are_valid_and_complete():
    model = MODEL_PRESETS["tiny"]
    found = enumerate_layouts(4, model, 16)
    assert all(l.world == 4 and l.is_valid(model, 16) for l in found)
    shapes = {(l.dp, l.fsdp, l.tp, l.pp) for l in found}
    assert {(4, 1, 1, 1), (1, 4, 1, 1), (2, 1, 2, 1), (1, 2, 2, 1), (2, 1, 1, 2), (1, 1, 2, 2)} <= shapes
    assert (1, 1, 4, 1) not in shapes  # tp=4 does not divide n_kv_heads=2
    assert all(l.world == 5 and l.tp == 1 for l in enumerate_layouts(5, model, 16))


def test_placement_checks_its_workers():
    with pytest.raises(ValueError, match="needs 4 workers, got 3"):
        Placement(Layout(dp=4), (0, 1, 2))
    with pytest.raises(ValueError, match="lists a worker twice"):
        Placement(Layout(dp=2), (1, 1))
