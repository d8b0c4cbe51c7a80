"""The planner's memory model (``plan/memory.py``): its terms, its calibration, budgets and reshard rounds."""

from __future__ import annotations

import dataclasses

import pytest

from elastic.core.config import LoraConfig
from elastic.core.layout import Layout, Placement
from elastic.model.loss import chunk_positions
from elastic.plan.costmodel import CostModel
from elastic.plan.decisions import Move, Pause, Stay
from elastic.plan.memory import MemoryModel
from elastic.plan.memory_budgets import held_bytes, node_budgets, round_bound
from elastic.plan.policy import Policy
from tests.helpers import tiny_config


def test_terms_follow_the_layout_the_micro_batch_and_checkpointing():
    cfg = tiny_config(global_batch=16, seq_len=16, n_layers=4)  # float64: 8 bytes an element
    m, vocab = MemoryModel(cfg), cfg.model.vocab_size
    (acts2, logits2), (acts4, logits4) = m.activations(Layout(dp=2)), m.activations(Layout(dp=4))
    # Logits: the micro-batch's rows x seq x vocab x (8 bytes of logits + 4 of the float32 log-softmax).
    assert logits2 == 8 * 16 * vocab * 12 and logits4 == 4 * 16 * vocab * 12
    assert m.activations(Layout(dp=2, microbatches=2))[1] == 4 * 16 * vocab * 12
    assert acts4 * 2 == acts2  # half the rows per rank
    assert m.estimate(Layout(dp=2)).terms["gather"] == 0 < m.estimate(Layout(fsdp=2)).terms["gather"]
    # A pipeline: the first stage holds no logits, the last no embedding; the busier stage is reported.
    pp = m.estimate(Layout(pp=2, microbatches=4))
    assert pp.terms["weights"] < m.estimate(Layout(dp=2)).terms["weights"]
    # Checkpointing keeps one dim-wide input per layer plus one layer's set: less, and less again with layers.
    ckpt = MemoryModel(cfg.replace(train=dataclasses.replace(cfg.train, activation_checkpointing=True)))
    kept = ckpt.activations(Layout(dp=2))[0]
    assert kept < acts2 / 2
    assert kept == 8 * 16 * cfg.model.dim * 4 * 8 + acts2 // 4  # inputs of 4 layers + 1 layer's set
    # A 152k vocabulary: the loss holds one chunk of positions' logits (model/loss.py), not the micro-batch's.
    big = MemoryModel(tiny_config(global_batch=16, seq_len=512, vocab_size=151936, max_seq_len=512))
    chunk = big.activations(Layout(dp=2))[1]
    assert chunk == chunk_positions(151936) * 151936 * 12 and chunk < 8 * 512 * 151936 * 12 / 30


def _mixed(cfg, on: bool = True, **train):
    return cfg.replace(train=dataclasses.replace(cfg.train, dtype="float32", mixed_precision="bf16" if on else "no",
                                                 **train))


def test_a_sharded_mixed_precision_step_peaks_at_the_head_backward_from_first_principles():
    """fsdp=2, full training, bf16 autocast over float32, tied embedding: the peak is the head's backward, with
    the root (embedding + final norm) gathered, and the head's gradient in bf16 and again in float32; the
    linears keep no bf16 copy of their weights (``model/cast_linear.py``), except under tp (DTensor weights).
    Bytes from the model's dimensions alone, not from the specs. First with FSDP gathering the embedding
    (``train.vocab_parallel = false``), then as the engine runs by default, the embedding kept in its vocabulary
    rows."""
    cfg = _mixed(tiny_config(global_batch=16, seq_len=16, n_layers=4, vocab_size=4096, tie_embeddings=True),
                 vocab_parallel=False)
    c = cfg.model
    q, kv = c.n_heads * (c.dim // c.n_heads), c.n_kv_heads * (c.dim // c.n_heads)
    matmul = c.dim * q + 2 * c.dim * kv + q * c.dim + 3 * c.dim * c.ffn_dim  # one layer's linear weights
    layer, head = matmul + 2 * c.dim, c.vocab_size * c.dim
    total, root = c.n_layers * layer + head + c.dim, head + c.dim  # elements; root: embedding/head + final norm
    m = MemoryModel(cfg)
    acts, logits = m.activations(Layout(fsdp=2))
    e = m.estimate(Layout(fsdp=2))
    assert e.moment == "backward: the head's gradient"
    # Every layer tensor is under glibc's mmap threshold: its heap keeps the step's high-water mark, two layers'
    # unsharded parameters and one layer's gradients in bf16 and float32.
    expected = {"weights": 4 * total / 2, "moments": 8 * total / 2, "gather": 4 * root,
                "casts": 0, "grads": (2 + 4) * head, "heap": 2 * 4 * layer + 6 * layer}
    for term, value in expected.items():
        assert e.terms[term] == pytest.approx(value, rel=1e-3), term
    assert e.step_bytes == pytest.approx(sum(expected.values()) + acts + logits, rel=1e-3)
    # LoRA's frozen base: no head gradient, so the peak is the backward's re-gather (the gathered root and its
    # all-gather buffer) with every bf16 weight copy held. The frozen layers' linears are stored in bf16
    # (train.frozen_bf16): 2 bytes each. Stored in float32, the frozen linears are 4 bytes each; neither they nor
    # the adapters nor the tied head are copied (cast_linear saves the float32 parameter).
    r = 4
    adapters = r * (2 * c.dim + 2 * q + 2 * (c.dim + kv) + 3 * (c.dim + c.ffn_dim))  # one layer's A and B
    lora = MemoryModel(cfg.replace(lora=LoraConfig(r=r))).estimate(Layout(fsdp=2))
    assert lora.moment == "backward begins: the root's gather" and lora.terms["grads"] == 0
    # Gathered as the backward begins: the root and the last layer (its linears in bf16, its norms and
    # adapters in float32), each as all-gather buffer and copy.
    lora_layer = 2 * matmul + 4 * (2 * c.dim + adapters)
    assert lora.terms["gather"] == pytest.approx(2 * 4 * root + 2 * lora_layer, rel=1e-3)
    frozen = (2 * c.n_layers * matmul + 4 * (c.n_layers * 2 * c.dim + root)) / 2
    assert lora.terms["frozen"] == pytest.approx(frozen, rel=1e-3)
    assert lora.terms["casts"] == 0
    kept = MemoryModel(_mixed(cfg, frozen_bf16=False).replace(lora=LoraConfig(r=r))).estimate(Layout(fsdp=2))
    assert kept.terms["frozen"] == pytest.approx(frozen + c.n_layers * matmul, rel=1e-3)
    assert kept.terms["casts"] == 0
    # A reshard moves float32: it stages what the float32 run holds, and reads the bf16 ones out as float32 copies.
    assert lora.terms["reshard"] == pytest.approx(kept.terms["reshard"] + 4 * c.n_layers * matmul / 2, rel=1e-3)
    # Under tp the layers' weights are DTensors, whose F.linear under autocast keeps a bf16 copy of each rank's
    # half (the adapters' too); with checkpointing one layer's at a time. No mixed precision: no copies.
    tp = MemoryModel(cfg).estimate(Layout(tp=2))
    assert tp.terms["casts"] == pytest.approx(2 * c.n_layers * matmul / 2, rel=1e-3)
    lora_tp = MemoryModel(_mixed(cfg, frozen_bf16=False).replace(lora=LoraConfig(r=r))).estimate(Layout(tp=2))
    # Each rank's adapters: a column-parallel base splits B's rows (A whole), a row-parallel one A's columns.
    adapters_tp = r * ((c.dim + q / 2) + 2 * (c.dim + kv / 2) + (q / 2 + c.dim) + 2 * (c.dim + c.ffn_dim / 2)
                       + (c.ffn_dim / 2 + c.dim))
    assert lora_tp.terms["casts"] == pytest.approx(2 * c.n_layers * (matmul / 2 + adapters_tp), rel=1e-3)
    assert MemoryModel(_mixed(cfg, on=False)).estimate(Layout(tp=2)).terms["casts"] == 0
    ckpt = MemoryModel(_mixed(cfg, activation_checkpointing=True)).estimate(Layout(tp=2))
    assert ckpt.terms["casts"] == pytest.approx(2 * matmul / 2, rel=1e-3)
    # Replicated (dp=2): nothing is gathered; the whole gradients at the end of the backward can be the peak.
    dp = MemoryModel(cfg).estimate(Layout(dp=2))
    assert dp.terms["gather"] == 0 and dp.step_bytes < e.step_bytes + 4 * total
    # Vocabulary-parallel (the default): only the final norm is gathered; the head's matmul keeps no copy of its
    # weight (a block of rows cast at a time) and its gradient is the rank's half of the rows, at float32 only;
    # the loss sees both ranks' 8 x 16 positions over 2,048 rows, plus the gathered final hidden states and their
    # gradient.
    vp = MemoryModel(_mixed(cfg, vocab_parallel=True))
    sharded = vp.estimate(Layout(fsdp=2))
    assert sharded.moment == "backward: the head's gradient"
    for term, value in {**expected, "gather": 4 * c.dim, "grads": 4 * head / 2}.items():
        assert sharded.terms[term] == pytest.approx(value, rel=1e-3), term
    positions = 2 * 8 * 16
    assert vp.activations(Layout(fsdp=2))[1] == positions * 2048 * (2 + 4) + 2 * positions * c.dim * 4
    assert vp.estimate(Layout(dp=2)).terms == dp.terms  # nothing is sharded without fsdp


def test_full_fine_tuning_of_a_deep_model_peaks_in_the_layers_backward_from_first_principles():
    """fsdp=2, full training, bf16 autocast over float32, a tied embedding kept in its vocabulary rows, many layers
    and a small vocabulary, a short batch: the peak is the end of the layers' backward, with every gradient shard,
    the first layer's unsharded float32 gradients and parameters, and the next layer's all-gather buffer (freed only
    when it is used; FSDP's reduce-scatter input is freed at once, ``parallel/fsdp.py``). At the end of the backward
    the tied embedding's gradient is one buffer of its rows (``parallel/vocab.py``), where FSDP's gathered embedding
    adds the lookup's whole dense gradient. Bytes from the model's dimensions alone, not from the specs."""
    cfg = _mixed(tiny_config(global_batch=2, seq_len=8, n_layers=16, vocab_size=512, tie_embeddings=True),
                 vocab_parallel=True)
    c = cfg.model
    q, kv = c.n_heads * (c.dim // c.n_heads), c.n_kv_heads * (c.dim // c.n_heads)
    layer = c.dim * q + 2 * c.dim * kv + q * c.dim + 3 * c.dim * c.ffn_dim + 2 * c.dim  # one layer's elements
    head = c.vocab_size * c.dim
    total = c.n_layers * layer + head + c.dim  # the tied embedding once, and the final norm
    m = MemoryModel(cfg)
    e = m.estimate(Layout(fsdp=2))
    assert e.moment == "backward: the layers'"
    # The heap's high-water mark (two layers' parameters, one layer's gradients in bf16 and float32) is all live
    # then: the gradient shards of the 16 layers alone are more.
    expected = {"weights": 4 * total / 2, "moments": 8 * total / 2, "grads": 4 * total / 2 + 4 * layer,
                "gather": 2 * 4 * layer, "casts": 0, "heap": 0, "activations": 0, "logits": 0}
    for term, value in expected.items():
        assert e.terms[term] == pytest.approx(value, rel=1e-3), term
    assert e.step_bytes == pytest.approx(sum(expected.values()), rel=1e-3)
    # The end of the backward: the gradient shards and the gathered final norm's gradient; FSDP gathering the
    # embedding (vocab_parallel=false) adds the whole root's gradient and the lookup's whole dense gradient.
    ends = m._moments(Layout(fsdp=2), 0)["backward ends"]
    assert ends["grads"] == pytest.approx(4 * total / 2 + 4 * c.dim, rel=1e-3)
    gathered = MemoryModel(_mixed(cfg, vocab_parallel=False))._moments(Layout(fsdp=2), 0)["backward ends"]
    assert gathered["grads"] == pytest.approx(4 * total / 2 + 4 * (head + c.dim) + 4 * head, rel=1e-3)


def test_calibration_fits_a_constant_then_a_factor_on_activations():
    """A made-up worker whose true peak is the static terms + 2 x the predicted activations + 5 MB: one layout
    cannot tell the two apart (the gap becomes the constant, and that layout is then predicted exactly);
    a second layout with other activations recovers both, and an unseen layout is then predicted right."""
    cfg = tiny_config(global_batch=16)
    truth, model = MemoryModel(cfg, scale=2.0, overhead=5e6), MemoryModel(cfg)
    model.observe(Layout(dp=2), 0)  # not known: ignored
    assert not model.seen and model.scale == 1.0
    model.observe(Layout(dp=2), truth.estimate(Layout(dp=2)).step_bytes)
    assert model.scale == 1.0 and model.overhead > 5e6
    assert model.estimate(Layout(dp=2)).step_bytes == pytest.approx(truth.estimate(Layout(dp=2)).step_bytes, rel=1e-6)
    before = model.report()[0]["predicted_gb"]
    model.observe(Layout(dp=4), truth.estimate(Layout(dp=4)).step_bytes)
    assert model.scale == pytest.approx(2.0, rel=1e-3) and model.overhead == pytest.approx(5e6, rel=1e-3)
    unseen = Layout(fsdp=2, dp=2)
    assert model.estimate(unseen).step_bytes == pytest.approx(truth.estimate(unseen).step_bytes, rel=1e-3)
    rows = {r["layout"]: r for r in model.report()}
    assert rows["dp=2"]["predicted_gb"] == before and set(rows) == {"dp=2", "dp=4"}
    assert rows["dp=4"]["measured_gb"] == pytest.approx(truth.estimate(Layout(dp=4)).step_bytes / 1e9, abs=1e-3)
    assert model.lines()[0].startswith("memory on dp=2: a step's peak predicted")
    assert rows["dp=4"]["calibrated_gb"] == pytest.approx(rows["dp=4"]["measured_gb"], abs=2e-3)


def test_budgets_share_a_node_among_its_workers_less_their_idle_memory():
    budgets = node_budgets({0: "a", 1: "a", 2: "b", 3: "c"}, {"a": 10_000, "b": 4_000}, {0: 1_000, 1: 1_000, 2: 500})
    assert budgets == {0: 3_000, 1: 3_000, 2: 2_700}  # (0.8 * 10000 - 2000) / 2; 0.8 * 4000 - 500; c: unknown
    assert node_budgets({0: "a", 1: "a"}, {"a": 10_000}, {0: 1_000}) == {0: 3_000, 1: 3_000}  # 1's idle: typical
    assert node_budgets({0: "a"}, {"a": 1_000}, {0: 2_000}) == {0: 1}  # nothing fits, which is not "no limit"


def test_reshard_rounds_fit_the_headroom_of_the_workers_taking_part():
    cfg = tiny_config(global_batch=16)
    cfg = cfg.replace(runtime=dataclasses.replace(cfg.runtime, reshard_round_bytes=1 << 20, reshard_chunk_bytes=4096))
    m = MemoryModel(cfg)
    old, new = Placement(Layout(dp=2), (0, 1)), Placement(Layout(fsdp=4), (0, 1, 2, 3))
    resident = held_bytes(m, old, 0) + held_bytes(m, new, 0)
    assert held_bytes(m, old, 2) == 0 and held_bytes(m, new, 0) == pytest.approx(held_bytes(m, old, 0) / 4, rel=0.05)
    assert round_bound(m, {}, old, new, [0, 1, 2, 3]) == 1 << 20  # no budget known: the configured rounds
    assert round_bound(m, {w: 10**9 for w in range(4)}, old, new, [0, 1, 2, 3]) == 1 << 20
    assert round_bound(m, {0: resident + 50_000, 1: 10**9}, old, new, [0, 1]) == 50_000  # worker 0's headroom
    assert round_bound(m, {0: resident}, old, new, [0, 1]) == 4096  # at least one message


def test_a_sharded_layout_is_chosen_over_replicating_when_only_it_fits():
    """Four workers drop to two. Without a budget the policy replicates (dp=2); with a budget per worker that
    fits fsdp=2 and not dp=2 it shards, and the move's rounds are bounded by the two workers' headroom."""
    cfg = tiny_config(global_batch=16)
    cost = CostModel(cfg.model, 16, cfg.data.seq_len, 8, cores=2)
    free = Policy(cfg, cost)
    current = Placement(Layout(fsdp=4), (0, 1, 2, 3))
    replicated = free.decide(current, [0, 1], 100, must_move=True)
    assert isinstance(replicated, Move) and replicated.placement.layout == Layout(dp=2)
    bounded = Policy(cfg, cost)
    sharded, dp2 = bounded.memory.peak(Layout(fsdp=2)), bounded.memory.peak(Layout(dp=2))
    assert sharded < dp2
    bounded.budgets = {w: (sharded + dp2) // 2 for w in range(4)}  # what the controller derives from Ray
    moved = bounded.decide(current, [0, 1], 100, must_move=True)
    assert isinstance(moved, Move) and moved.placement.layout.dp == 1, moved
    assert bounded.memory.peak(moved.placement.layout) <= bounded.budgets[0]
    assert 0 < moved.round_bytes < cfg.runtime.reshard_round_bytes  # the headroom binds, not the configured 256 MB
    # A running placement may stay though nothing else fits (it has run); a lost worker's may not.
    bounded.budgets = {w: 1000 for w in range(4)}
    assert isinstance(bounded.decide(current, [0, 1, 2, 3], 100), Stay)
    paused = bounded.decide(current, [0, 1], 100, must_move=True)
    assert isinstance(paused, Pause) and "no layout fits 2 workers in 0.00 MB each (Ray's node memory" in paused.reason
    assert "no layout of up to 64 workers fits" in paused.reason and "the smallest predicted peak is" in paused.reason


def test_node_memory_is_what_ray_reports_for_the_workers_nodes_asked_once(monkeypatch):
    from elastic.driver import membership

    asked = []
    nodes = [{"NodeID": "a", "Alive": True, "Resources": {"memory": 6e9, "object_store_memory": 2e9, "CPU": 2}},
             {"NodeID": "b", "Alive": True, "Resources": {"memory": 1e9}},
             {"NodeID": "gone", "Alive": False, "Resources": {"memory": 9e9}}]
    monkeypatch.setattr(membership.ray, "nodes", lambda: asked.append(1) or nodes)
    members = membership.Membership(tiny_config(), "127.0.0.1", 1)
    members.actors, members.info = {0: None, 1: None}, {0: {"node_id": "a", "idle_rss": 5e8}, 1: {"node_id": "a"}}
    assert members.node_memory() == {"a": 8_000_000_000} and members.idle_bytes() == {0: 5e8}
    assert members.node_memory() == {"a": 8_000_000_000} and len(asked) == 1  # a node's size is asked once


def test_workers_fix_glibcs_mmap_threshold_and_the_heap_term_follows_it():
    """``runtime.malloc_mmap_threshold`` (1 MiB): a worker's engine fixes glibc's threshold (runtime/heap.py;
    this machine runs glibc), and the memory model's heap holds only tensors under it; 0 leaves glibc's dynamic
    threshold, whose cap the model then uses."""
    from elastic.plan.memory import MMAP_MAX
    from elastic.runtime.heap import bound_heap

    cfg = tiny_config()
    assert cfg.runtime.malloc_mmap_threshold == 1 << 20 and MemoryModel(cfg).mmap_threshold == 1 << 20
    assert bound_heap(1 << 20) and bound_heap(1 << 20) and not bound_heap(0)
    off = cfg.replace(runtime=dataclasses.replace(cfg.runtime, malloc_mmap_threshold=0))
    assert MemoryModel(off).mmap_threshold == MMAP_MAX
    # A layer of 2 MiB tensors: in the heap under glibc's dynamic threshold, mmapped (no heap term) under 1 MiB.
    wide = _mixed(tiny_config(dim=512, ffn_dim=1024, n_heads=8, n_kv_heads=8, n_layers=2))
    fixed, dynamic = (MemoryModel(c).estimate(Layout(fsdp=2)) for c in
                      (wide, wide.replace(runtime=dataclasses.replace(wide.runtime, malloc_mmap_threshold=0))))
    assert fixed.terms["heap"] < dynamic.terms["heap"]
