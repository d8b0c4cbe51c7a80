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
order of float additions. No distributed code: FSDP gathers the head's weight around the stage's forward and
backward, and the checkpoint's recompute runs inside that backward.
"""

from __future__ import annotations

from collections.abc import Callable

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

    total = None
    for start in range(0, len(targets), chunk):
        piece = torch.utils.checkpoint.checkpoint(part, flat[start:start + chunk], targets[start:start + chunk],
                                                  use_reentrant=False)
        total = piece if total is None else total + piece
    return total
