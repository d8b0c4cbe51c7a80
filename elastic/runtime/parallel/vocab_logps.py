"""Per-token log-probs and entropies from the vocabulary rows an fsdp rank holds (GRPO's policy step).

``VocabShard.token_logps`` calls ``token_logps`` here: what ``model/loss.lm_token_logps`` computes from the whole
LM head, computed instead from this rank's shard of the head's rows, so the head's weight is never gathered and
no [positions, vocabulary] tensor exists beyond one chunk of positions. As ``VocabShard.loss_sum`` does for the
cross-entropy: the ranks all-gather their final hidden states and targets (``_GatherRows``, whose backward
reduce-scatters the hidden states' gradients back), each computes its range's logits for every gathered
position in chunks of positions (``vocab._Head``, checkpointed when gradients are on), and per position the softmax's
max is all-reduced, then its sum of exponentials, the target's logit and, for the entropy, sum exp(x - max) *
(x - max). Then log p(t) = x_t - max - log S and H = log S - sum exp(x - max) (x - max) / S, every rank holding
every position's; each returns its own rows. Backward: each rank's log-probs' gradient is summed over the ranks
position by position (each knows only its own), and the logits' gradient on the rank's rows is
g (onehot(t) - softmax). The entropy is detached (TRL's ``entropy_from_logits``).

Equal to the whole-head computation up to the order of float additions. Assumes what ``vocab.py`` assumes: every
rank of the fsdp group makes the same calls in the same order, with any number of rows each, on CPU tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from elastic.model.loss import chunk_positions, in_chunks


def token_logps(shard, hidden: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, with_entropy: bool,
                chunk_bytes: int | None, gather_rows, head):
    """(Log-probs of ``targets``, entropies or None), both of ``targets``' shape, from this rank's local rows ``w``
    of the LM head. ``hidden``: [..., dim], ``targets``: its leading shape (token ids, no ignore index).
    ``shard``: the ``VocabShard``; ``gather_rows`` and ``head``: its ``_GatherRows.apply`` and ``_Head.apply``
    (passed in, so that this module does not import ``vocab.py``, which imports it)."""
    flat, ids = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    sizes = shard.sizes(len(ids))
    every = gather_rows(flat, shard, sizes)
    ids = shard.gather(ids, sizes)
    start = sum(sizes[:shard.index])
    own = slice(start, start + sizes[shard.index])
    chunk = chunk_positions(shard.rows, chunk_bytes)  # the same on every rank: the collectives line up
    pieces = in_chunks(_chunk, (every, ids), chunk, w, shard, with_entropy, head)
    if not pieces:  # no rank has a position
        empty = flat.new_zeros(targets.shape, dtype=torch.promote_types(flat.dtype, torch.float32))
        return empty, empty if with_entropy else None
    logps = torch.cat([p[0] for p in pieces])[own].view(targets.shape)
    return logps, torch.cat([p[1] for p in pieces])[own].view(targets.shape) if with_entropy else None


def _chunk(hidden: torch.Tensor, targets: torch.Tensor, w: torch.Tensor, shard, with_entropy: bool, head):
    compute = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else w.dtype
    return _TokenLogps.apply(head(hidden, w, compute), targets, shard, with_entropy)


def global_max(logits: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(``logits`` upcast to float32 from a half dtype, each position's max over every rank's vocabulary range of
    ``group``): the softmax's shift, for this file's log-probs and ``vocab._CrossEntropy``. A rank with no rows
    (an empty shard) contributes -inf."""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    most = x.amax(-1) if x.shape[-1] else x.new_full(x.shape[:1], float("-inf"))
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=group)
    return x, most


class _TokenLogps(torch.autograd.Function):
    """Every gathered position's (log-prob of its target, entropy or None) from this rank's range of its logits."""

    @staticmethod
    def forward(ctx, logits, targets, shard, with_entropy: bool):
        x, most = global_max(logits, shard.group)
        ids = targets - shard.lo
        inside = (ids >= 0) & (ids < x.shape[-1])
        target = torch.zeros_like(most)
        target[inside] = x[inside, ids[inside]] - most[inside]
        shifted = x - most[:, None]
        del x
        exp = shifted.exp()
        parts = [exp.sum(-1), target]
        if with_entropy:
            parts.append((exp * shifted).sum(-1))
        del shifted
        sums = torch.stack(parts)
        dist.all_reduce(sums, group=shard.group)
        log_total = torch.log(sums[0])
        ctx.save_for_backward(exp, sums[0], ids, inside)
        ctx.shard, ctx.dtype = shard, logits.dtype
        if not with_entropy:
            return sums[1] - log_total, None
        entropy = log_total - sums[2] / sums[0]
        ctx.mark_non_differentiable(entropy)
        return sums[1] - log_total, entropy

    @staticmethod
    def backward(ctx, grad, _entropy_grad):
        exp, total, ids, inside = ctx.saved_tensors
        # Zero at other ranks' positions: theirs come in the sum. A copy, since it is reduced in place.
        per = grad.to(exp.dtype, copy=True)
        dist.all_reduce(per, group=ctx.shard.group)
        out = exp * (per / total)[:, None]
        out.neg_()
        out[inside, ids[inside]] += per[inside]
        return out.to(ctx.dtype), None, None, None
