"""Per-token log-probs and entropies on vocabulary shards (``runtime/parallel/vocab_logps.py``) against plain torch,
in float64.

Four gloo processes (no Ray) run two meshes, as ``test_vocab_parallel.py``: dp=2 x fsdp=2 with a vocabulary of 11
(shards of 6 and 5 rows) and fsdp=4 with 9 (shards of 3, 3, 3 and none). Every rank holds a different number of
sequences, the log-probs run whole and in chunks of a few positions (fewer than the positions), with and without
entropies, with gradients on and off. Each process computes the same objective for all ranks' sequences in one
process with ``F.linear`` on the whole weight and ``F.log_softmax`` (the independent definition), and compares
its own log-probs and entropies, its hidden states' gradient and its weight shard's gradient; and once under bf16
autocast, at bf16's tolerance.
"""

from __future__ import annotations

import pytest

from tests.dist.ranks import run_mesh_checks

DIM, SEQ = 5, 3


def _rows(data_rank: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(200 + data_rank)
    hidden = torch.randn(data_rank % 3 + 1, SEQ, DIM, dtype=torch.float64, generator=g)
    targets = torch.randint(0, vocab, hidden.shape[:2], generator=g)
    coef = torch.randn(hidden.shape[:2], dtype=torch.float64, generator=g)  # the objective's weights
    return hidden, targets, coef


def _reference(full, vocab: int, data_rank: int, world: int):
    """(log-probs, entropies, hidden gradient) of this rank's rows and the whole weight's gradient, one process."""
    import torch
    import torch.nn.functional as F

    weight = full.clone().requires_grad_()
    total, mine = 0, None
    for r in range(world):
        hidden, targets, coef = _rows(r, vocab)
        hidden.requires_grad_()
        every = F.log_softmax(F.linear(torch.tanh(hidden), weight), dim=-1)
        logps = every.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        total = total + (logps * coef).sum()
        if r == data_rank:
            mine = (logps, -(every.exp() * every).sum(-1).detach(), hidden)
    total.backward()
    return mine[0].detach(), mine[1], mine[2].grad, weight.grad


def _check(mesh, vocab: int, data_rank: int, world: int, chunk_bytes: int | None) -> list[str]:
    import torch
    from torch.distributed.tensor import distribute_tensor

    from elastic.runtime.parallel.vocab import VocabShard

    full = torch.randn(vocab, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    shard = VocabShard(mesh, vocab, head=True)
    weight = distribute_tensor(full.clone(), mesh, shard.placements, src_data_rank=None).requires_grad_()
    hidden, targets, coef = _rows(data_rank, vocab)
    hidden.requires_grad_()
    logps, entropy = shard.token_logps(torch.tanh(hidden), weight, targets, True, chunk_bytes)
    (logps * coef).sum().backward()
    grad = weight.grad.redistribute(mesh, shard.placements).to_local()  # what Engine._settle_grads does
    with torch.no_grad():
        quiet, none = shard.token_logps(torch.tanh(hidden), weight, targets, False, chunk_bytes)

    want, want_entropy, want_hidden, want_weight = _reference(full, vocab, data_rank, world)
    rows = weight.to_local().shape[0]
    lo = min(vocab, shard.index * shard.rows)
    errors = [] if none is None and not entropy.requires_grad else [f"rank {data_rank}: entropy not detached"]
    for what, got, wanted in (("log-probs", logps.detach(), want), ("entropies", entropy, want_entropy),
                              ("log-probs without gradients", quiet, want),
                              ("hidden grad", hidden.grad, want_hidden),
                              ("weight grad", grad, want_weight[lo:lo + rows])):
        err = (got - wanted).abs().max().item() if got.numel() else 0.0
        if not err <= 1e-12 or got.shape != wanted.shape:
            errors.append(f"rank {data_rank}, vocab {vocab}, chunks {chunk_bytes}: {what} off by {err}")
    return errors


def _check_autocast(mesh, data_rank: int) -> list[str]:
    """Under bf16 autocast over float32 weights (``train.mixed_precision``): the float32 log-softmax of the same
    bf16 logits, up to float32 summation order; the hidden states' gradient up to bf16 rounding (``_Head`` sums it
    in float32 where ``F.linear`` rounds it to bf16)."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.tensor import distribute_tensor

    from elastic.runtime.parallel.vocab import VocabShard

    vocab, dim = 37, 16
    full = torch.randn(vocab, dim, generator=torch.Generator().manual_seed(7))
    shard = VocabShard(mesh, vocab, head=True)
    weight = distribute_tensor(full.clone(), mesh, shard.placements, src_data_rank=None)
    g = torch.Generator().manual_seed(data_rank)
    hidden = torch.randn(data_rank + 1, SEQ, dim, generator=g).requires_grad_()
    targets = torch.randint(0, vocab, hidden.shape[:2], generator=g)
    whole = hidden.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps, entropy = shard.token_logps(hidden, weight, targets, True)
        every = F.log_softmax(F.linear(whole, full).float(), dim=-1)
    want = every.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logps.sum().backward()
    want.sum().backward()
    errors = [f"rank {data_rank}, autocast: {what} off by {err}" for what, err, bound in (
        ("log-probs", (logps - want).abs().max().item(), 1e-5),
        ("entropies", (entropy - -(every.exp() * every).sum(-1)).abs().max().item(), 1e-5),
        ("hidden grad", ((hidden.grad - whole.grad).abs().max() / whole.grad.abs().max()).item(), 1e-2))
        if not err <= bound]
    return errors + ([] if logps.dtype == torch.float32 else [f"rank {data_rank}: log-probs in {logps.dtype}"])


def _checks(hsdp, flat, rank: int, world: int) -> list[str]:
    errors = []
    for chunk_bytes in (None, 4 * 2 * 6):  # whole; two positions of a 6-row shard per chunk
        errors += _check(hsdp, 11, rank, world, chunk_bytes)
        errors += _check(flat, 9, rank, world, chunk_bytes)
    errors += _check_autocast(flat, rank)
    return errors


@pytest.mark.timeout(90)
def test_vocab_parallel_logps_equal_whole_weight_log_softmax():
    errors = run_mesh_checks(_checks, timeout=80)
    assert not errors, "\n".join(errors)
