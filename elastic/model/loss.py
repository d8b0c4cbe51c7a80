"""The causal-LM loss: a sum of next-token cross-entropies, whole or over chunks of positions.

``causal_lm_loss_sum`` takes logits. ``lm_loss_sum`` takes the final hidden states and the LM head instead, so
that the logits over a large vocabulary need not exist for the whole micro-batch at once: past
``CHUNK_LOGIT_BYTES`` of float32 logits it cuts the positions into chunks and checkpoints each chunk's head and
loss (``torch.utils.checkpoint``, non-reentrant): the forward keeps only the hidden states and a scalar per
chunk, and the backward recomputes one chunk's logits at a time. A 152k vocabulary at 2 x 512 tokens holds
0.6 GB of float32 logits whole (and as much again for their gradient); chunked, 64 MB. The price is the head's
matmul once more in backward (about one layer's worth per 14 of Qwen2.5-0.5B). Below the threshold the loss is
computed whole, exactly as ``causal_lm_loss_sum`` of the logits. Chunked, the loss is the sum of the chunks'
sums, and the head's gradient the sum of the chunks' contributions: equal to the whole computation up to the
order of float additions. ``lm_token_logps`` does the same for per-token log-probs and entropies (GRPO's policy
step, its old and reference log-probs): the same chunks, each checkpointed, with ``token_logps_of``'s float32
log-softmax and gather per chunk. No distributed code: FSDP gathers the head's weight around the stage's forward and
backward, and the checkpoint's recompute runs inside that backward.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

CHUNK_LOGIT_BYTES = 64 * 2**20  # float32 logits per chunk: small beside a worker's share of a 0.5B model


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over positions whose label is not -100.

    Callers divide by the number of target tokens in the *global* batch, so the gradient is the
    same however the batch is split across ranks and micro-batches.
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")


def chunk_positions(vocab: int, chunk_bytes: int | None = None) -> int:
    """Positions per chunk: as many as fit ``chunk_bytes`` (default ``CHUNK_LOGIT_BYTES``) of float32 logits
    (at least one)."""
    return max(1, (CHUNK_LOGIT_BYTES if chunk_bytes is None else chunk_bytes) // (4 * vocab))


def lm_loss_sum(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], vocab: int,
                labels: torch.Tensor, chunk_bytes: int | None = None) -> torch.Tensor:
    """``causal_lm_loss_sum(head(hidden), labels)``, in chunks of positions when the logits would exceed
    ``chunk_bytes`` in float32. ``hidden``: [..., dim], ``labels``: its leading shape; ``head``: hidden -> logits."""
    chunk = chunk_positions(vocab, chunk_bytes)
    flat, targets = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if len(targets) <= chunk:
        return causal_lm_loss_sum(head(hidden), labels)

    def part(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss_sum(head(h), y)

    return functools.reduce(operator.add, in_chunks(part, (flat, targets), chunk))


def in_chunks(fn: Callable, per_position: Sequence[torch.Tensor], chunk: int, *shared) -> list:
    """``fn(*(t[at:at + chunk] for t in per_position), *shared)`` for each chunk of ``chunk`` positions, in order;
    each checkpointed while gradients are on (non-reentrant), so that the backward too recomputes and holds one
    chunk's logits at a time. The chunked losses and log-probs here and in ``runtime/parallel/vocab*.py``."""
    pieces = []
    for at in range(0, len(per_position[0]), chunk):
        args = (*(t[at:at + chunk] for t in per_position), *shared)
        pieces.append(torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
                      if torch.is_grad_enabled() else fn(*args))
    return pieces


def token_logps_of(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False):
    """(Log-probs of ``targets`` under the float32 log-softmax of ``logits``, each position's entropy or None).

    The entropy, -sum p log p, is detached (TRL's ``entropy_from_logits``): a statistic, never a loss term here."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    every = F.log_softmax(logits, dim=-1)
    logps = torch.gather(every, -1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logps, None
    # After the gather: a checkpoint's recompute stops once it has what the backward saved (early stop), so the
    # entropy, which saves nothing, is not taken again in backward.
    with torch.no_grad():
        return logps, -(every.exp() * every).sum(-1)


def lm_token_logps(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], vocab: int,
                   targets: torch.Tensor, with_entropy: bool = False, chunk_bytes: int | None = None):
    """``token_logps_of(head(hidden), targets, with_entropy)``, in chunks of positions as ``lm_loss_sum``: the
    whole micro-batch's logits never exist at once. ``hidden``: [..., dim], ``targets``: its leading shape;
    returns log-probs and entropies (or None) of that shape. Checkpointed when gradients are on, so the backward
    too holds one chunk's logits at a time."""
    chunk = chunk_positions(vocab, chunk_bytes)
    flat, ids = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if len(ids) <= chunk:
        return token_logps_of(head(hidden), targets, with_entropy)

    def part(h: torch.Tensor, y: torch.Tensor):
        return token_logps_of(head(h), y, with_entropy)

    pieces = in_chunks(part, (flat, ids), chunk)
    logps = torch.cat([p[0] for p in pieces]).view(targets.shape)
    return logps, torch.cat([p[1] for p in pieces]).view(targets.shape) if with_entropy else None
