"""The vocabulary-parallel lookup, head and loss (``runtime/parallel/vocab.py``) against plain torch, in float64.

Four gloo processes (no Ray) run two meshes: dp=2 x fsdp=2 (HSDP: the shard's gradient is a partial sum over
the replicas until it is settled) with a vocabulary of 11 (uneven shards of 6 and 5 rows), and fsdp=4 with 9
(shards of 3, 3, 3 and none). Every rank holds a different number of rows, some labels are -100, the loss runs
whole and in chunks of a few positions, and the logits path runs too. Each process computes the same objective
for all ranks' rows in one process with ``F.embedding``, ``F.linear`` and ``F.cross_entropy`` on the whole
weight (the independent definition), and compares its own loss, its hidden states' gradient and its weight
shard's gradient.
"""

from __future__ import annotations

import datetime

import pytest

from tests.dist.ranks import run_ranks

DIM, SEQ = 5, 3


def _rows(data_rank: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(100 + data_rank)
    tokens = torch.randint(0, vocab, (data_rank % 3 + 1, SEQ), generator=g)
    labels = torch.randint(0, vocab, tokens.shape, generator=g)
    labels[0, 0] = -100
    return tokens, labels


def _objective(embed, head, loss, tokens, labels, hidden_grad_sink=None):
    """The test's model: embedding, a nonlinearity, then the loss and a term on the logits."""
    import torch

    h = torch.tanh(embed(tokens))
    if hidden_grad_sink is not None:
        h.retain_grad()
        hidden_grad_sink.append(h)
    return loss(h, labels), 1e-2 * head(h).square().sum()


def _check(mesh, vocab: int, data_rank: int, world: int, chunk_bytes: int | None) -> list[str]:
    import torch
    import torch.nn.functional as F
    from torch.distributed.tensor import distribute_tensor

    from elastic.runtime.parallel.vocab import VocabShard

    full = torch.randn(vocab, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    shard = VocabShard(mesh, vocab, head=True)
    weight = distribute_tensor(full.clone(), mesh, shard.placements, src_data_rank=None).requires_grad_()
    tokens, labels = _rows(data_rank, vocab)
    sink: list = []
    loss, extra = _objective(lambda x: shard.embed(x, weight), lambda h: shard.logits(h, weight),
                             lambda h, y: shard.loss_sum(h, weight, y, chunk_bytes), tokens, labels, sink)
    (loss + extra).backward()
    grad = weight.grad.redistribute(mesh, shard.placements).to_local()  # what Engine._settle_grads does

    ref_w = full.clone().requires_grad_()
    ref_sink: list = []
    total = 0
    for r in range(world):
        t, y = _rows(r, vocab)
        ref_loss, ref_extra = _objective(lambda x: F.embedding(x, ref_w), lambda h: F.linear(h, ref_w),
                                         lambda h, y: F.cross_entropy(F.linear(h, ref_w).reshape(-1, vocab),
                                                                      y.reshape(-1), reduction="sum"),
                                         t, y, ref_sink)
        total = total + ref_loss + ref_extra
        if r == data_rank:
            mine = ref_loss
    total.backward()
    rows = weight.to_local().shape[0]
    lo = min(vocab, shard.index * shard.rows)
    errors = []
    for what, got, want in (("loss", loss.detach(), mine.detach()),
                            ("hidden grad", sink[0].grad, ref_sink[data_rank].grad),
                            ("weight grad", grad, ref_w.grad[lo:lo + rows])):
        err = (got - want).abs().max().item() if got.numel() else 0.0
        if not err <= 1e-12 or got.shape != want.shape:
            errors.append(f"rank {data_rank}, vocab {vocab}, chunks {chunk_bytes}: {what} off by {err}")
    return errors


def _rank_main(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    errors = []
    try:
        hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "fsdp"))
        flat = init_device_mesh("cpu", (4,), mesh_dim_names=("fsdp",))
        for chunk_bytes in (None, 4 * 2 * 6):  # whole; two positions of a 6-row shard per chunk
            errors += _check(hsdp, 11, rank, world, chunk_bytes)
            errors += _check(flat, 9, rank, world, chunk_bytes)
    except Exception as err:  # reported, not swallowed: the test fails with it
        errors.append(f"rank {rank}: {type(err).__name__}: {err}")
    finally:
        queue.put((rank, errors))
        dist.destroy_process_group()


@pytest.mark.timeout(90)
def test_vocab_parallel_equals_whole_weight_ops():
    world = 4
    results = dict(run_ranks(_rank_main, world, timeout=80))
    assert sorted(results) == list(range(world))
    errors = [e for r in sorted(results) for e in results[r]]
    assert not errors, "\n".join(errors)
