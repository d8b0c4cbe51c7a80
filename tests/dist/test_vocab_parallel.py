"""The vocabulary-parallel lookup, head and loss (``runtime/parallel/vocab.py``) against plain torch, in float64.

Four gloo processes (no Ray) run two meshes: dp=2 x fsdp=2 (HSDP: the shard's gradient is a partial sum over the
replicas until it is settled) with a vocabulary of 11 (uneven shards of 6 and 5 rows), and fsdp=4 with 9 (shards of
3, 3, 3 and none). Every rank holds a different number of rows, some labels are -100, the loss runs whole and in
chunks of a few positions, and the logits path runs too. The head is the embedding (tied: the head's and the
lookup's gradients share one buffer, ``vocab._TiedGrad``), over one micro-batch and over two whose gradients
accumulate, or a separate weight (untied); and with GRPO's token log-probs in place of the loss. Each process
computes the same objective for all ranks' rows in one process with ``F.embedding``, ``F.linear`` and
``F.cross_entropy`` on the whole weights (the independent definition), and compares its own losses, its hidden
states' gradients and its weight shards' gradients.
"""

from __future__ import annotations

import pytest

from tests.dist.ranks import run_mesh_checks

DIM, SEQ = 5, 3


def _rows(data_rank: int, vocab: int, micro: int = 0):
    import torch

    g = torch.Generator().manual_seed(100 + data_rank + 1000 * micro)
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


def _check(mesh, vocab: int, data_rank: int, world: int, chunk_bytes: int | None, micros: int = 1,
           tied: bool = True, logps: bool = False) -> list[str]:
    import torch
    import torch.nn.functional as F
    from torch.distributed.tensor import distribute_tensor

    from elastic.runtime.parallel.vocab import VocabShard

    g = torch.Generator().manual_seed(7)
    full, full_head = (torch.randn(vocab, DIM, dtype=torch.float64, generator=g) for _ in range(2))
    if tied:
        full_head = full
    shard = VocabShard(mesh, vocab, head=True)
    weight = distribute_tensor(full.clone(), mesh, shard.placements, src_data_rank=None).requires_grad_()
    head = weight if tied else distribute_tensor(full_head.clone(), mesh, shard.placements,
                                                 src_data_rank=None).requires_grad_()
    losses, sink = [], []
    for m in range(micros):  # the micro-batches' gradients accumulate in .grad
        tokens, labels = _rows(data_rank, vocab, m)
        ours = (lambda h, y: -shard.token_logps(h, head, y.clamp(min=0), False, chunk_bytes)[0].sum()) if logps \
            else (lambda h, y: shard.loss_sum(h, head, y, chunk_bytes))
        loss, extra = _objective(lambda x: shard.embed(x, weight), lambda h: shard.logits(h, head), ours,
                                 tokens, labels, sink)
        (loss + extra).backward()
        losses.append(loss.detach())
    grads = [w.grad.redistribute(mesh, shard.placements).to_local()  # what Engine._settle_grads does
             for w in ((weight,) if tied else (weight, head))]

    ref_w = full.clone().requires_grad_()
    ref_head = ref_w if tied else full_head.clone().requires_grad_()
    ref_sink, mine, total = {}, [], 0
    for m in range(micros):
        for r in range(world):
            t, y = _rows(r, vocab, m)
            sunk: list = []
            if logps:  # minus the log-probs of the targets, -100 read as token 0
                def ref(h, y):
                    return -F.log_softmax(F.linear(h, ref_head), -1).gather(-1, y.clamp(min=0)[..., None]).sum()
            else:
                def ref(h, y):
                    return F.cross_entropy(F.linear(h, ref_head).reshape(-1, vocab), y.reshape(-1), reduction="sum")
            ref_loss, ref_extra = _objective(lambda x: F.embedding(x, ref_w), lambda h: F.linear(h, ref_head), ref,
                                             t, y, sunk)
            ref_sink[r, m] = sunk[0]
            total = total + ref_loss + ref_extra
            if r == data_rank:
                mine.append(ref_loss.detach())
    total.backward()
    rows = weight.to_local().shape[0]
    lo = min(vocab, shard.index * shard.rows)
    errors = []
    checks = [("weight grad", grads[0], ref_w.grad[lo:lo + rows])]
    checks += [] if tied else [("head grad", grads[1], ref_head.grad[lo:lo + rows])]
    for m in range(micros):
        checks += [(f"loss {m}", losses[m], mine[m]), (f"hidden grad {m}", sink[m].grad, ref_sink[data_rank, m].grad)]
    for what, got, want in checks:
        err = (got - want).abs().max().item() if got.numel() else 0.0
        if not err <= 1e-12 or got.shape != want.shape:
            errors.append(f"rank {data_rank}, vocab {vocab}, chunks {chunk_bytes}, micro-batches {micros}, "
                          f"tied {tied}, log-probs {logps}: {what} off by {err}")
    return errors


def _checks(hsdp, flat, rank: int, world: int) -> list[str]:
    errors = []
    for chunk_bytes in (None, 4 * 2 * 6):  # whole; two positions of a 6-row shard per chunk
        errors += _check(hsdp, 11, rank, world, chunk_bytes)
        errors += _check(flat, 9, rank, world, chunk_bytes)
    errors += _check(hsdp, 11, rank, world, 4 * 2 * 6, micros=2)  # tied, two micro-batches accumulated
    errors += _check(flat, 9, rank, world, 4 * 2 * 6, micros=2)
    errors += _check(hsdp, 11, rank, world, 4 * 2 * 6, micros=2, tied=False)
    errors += _check(flat, 9, rank, world, None, tied=False)
    errors += _check(hsdp, 11, rank, world, 4 * 2 * 6, micros=2, logps=True)  # GRPO's, tied
    return errors


@pytest.mark.timeout(180)
def test_vocab_parallel_equals_whole_weight_ops():
    errors = run_mesh_checks(_checks, timeout=170)
    assert not errors, "\n".join(errors)
