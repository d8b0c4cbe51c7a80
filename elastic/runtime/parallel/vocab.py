"""The embedding and the LM head kept in their fsdp shards: vocabulary-parallel lookup, head and cross-entropy.

FSDP2 gathers a unit's parameters whole around its use. The tensors outside the decoder layers are FSDP's root
unit, and the root's gather spans the whole forward, and again the whole backward: a real model's largest tensor,
the embedding (also the LM head when tied; Qwen2.5-0.5B's is 152k x 896, 545 MB in float32), sat whole on every
worker beside its bf16 copy, and a trained one's gradient too (``bench/memory.py``). Here the embedding and an
untied LM head are left out of FSDP (``ignored_params``) and held as DTensors with FSDP's own placement (a
contiguous range of vocabulary rows per fsdp rank, replicated over dp), so that reshards, checkpoints and exports
see the boxes they always saw. The computation goes to the rows instead (Megatron's vocab-parallel embedding and
cross-entropy, over the fsdp ranks, which unlike tp ranks hold different rows of the batch):

- **lookup**: the ranks all-gather their token ids; each looks up those in its range (zeros elsewhere), and a
  reduce-scatter hands every rank its own rows: exact, each element is one rank's row plus zeros. Backward: the
  output gradients are all-gathered and each rank adds those of its tokens into its shard's gradient.
- **head + loss** (a training forward with labels): the ranks all-gather their final hidden states and labels;
  each computes its vocabulary range's logits for every gathered position, in chunks of positions checkpointed as
  in ``model/loss.py``; per position, the softmax's max is all-reduced, then its sum of exponentials and the
  target's logit, so every rank knows every position's cross-entropy and returns the sum of its own. Backward:
  each rank's loss gradient is summed over the ranks position by position (each knows its own), the logits'
  gradient is softmax minus one-hot on the rank's range, and the hidden states' gradients are reduce-scattered
  back to their rank.
- **token log-probs** (GRPO's policy step, its old and reference log-probs): as head + loss, the log-probs of given
  tokens and each position's entropy on the rank's range (``vocab_logps.py``).
- **logits** (evaluation, a pipeline's last stage, whose schedule asks for logits): the weight is all-gathered
  for the call (DTensor's redistribute, whose backward reduce-scatters the gradient), as FSDP did.

A tied embedding's shard gets one gradient buffer per forward (``_TiedGrad``): the head's backward writes its
gradient there (returning none to autograd) and the lookup's adds its tokens' rows into it and returns it, where
autograd would hold the head's gradient, the lookup's dense one and their sum at once (three shards; 408 MB a
worker at the 494M shape, fsdp=4: the peak of a full fine-tuning step, ``bench/memory.py``). Both use the one
local tensor of the shard that the lookup took in this forward.

Equal to the single-process computation up to the order of float additions. A shard's gradient is a sum over the
fsdp ranks' rows already; over dp replicas it is left Partial, and ``Engine._settle_grads`` sums it once per step.
Under autocast the head's matmul runs in bf16 as in one process (``F.linear``), and the cross-entropy in float32.

Assumes every rank of the fsdp group runs the same calls in the same order (as FSDP's own collectives do), with
any number of rows each, and CPU tensors.
"""

from __future__ import annotations

import functools
import operator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from elastic.model.cast_linear import CastLinear
from elastic.model.loss import chunk_positions, in_chunks
from elastic.runtime.parallel import vocab_logps


class VocabShard:
    """One rank's vocabulary range of a stage over the fsdp group of ``mesh`` (FSDP's data mesh), and the ops
    ``LlamaStage`` calls with the vocabulary-sharded weight (``LlamaStage.vocab``)."""

    def __init__(self, mesh: DeviceMesh, vocab: int, head: bool) -> None:
        self.mesh, self.head = mesh, head  # head: the stage's LM head is one of the sharded weights
        self.placements = tuple(Shard(0) if name == "fsdp" else Replicate() for name in mesh.mesh_dim_names)
        # The gradient of the local shard is complete over fsdp and a partial sum over dp replicas.
        self.grad_placements = tuple(Partial() if p.is_replicate() else p for p in self.placements)
        self.group = mesh.get_group("fsdp")
        self.size, self.index = dist.get_world_size(self.group), mesh.get_local_rank("fsdp")
        self.rows = -(-vocab // self.size)  # torch.chunk's split: FSDP2's and DTensor's Shard(0)
        self.lo = min(vocab, self.index * self.rows)
        self._tied = None  # (weight, its local rows, _TiedGrad) of the lookup of the forward running, for its head

    # ---- the stage's ops -------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor, weight: DTensor) -> torch.Tensor:
        local, tied = self._local(weight), None
        if self.head and torch.is_grad_enabled() and local.requires_grad:  # the head may be this weight: tied
            tied = _TiedGrad()
        self._tied = (weight, local, tied) if tied is not None else None
        return _Lookup.apply(local, tokens, self, tied)

    def logits(self, hidden: torch.Tensor, weight: DTensor) -> torch.Tensor:
        self._tied = None
        whole = [Replicate()] * weight.device_mesh.ndim
        full = weight.redistribute(weight.device_mesh, whole).to_local(grad_placements=[Partial()] * len(whole))
        return F.linear(hidden, full)

    def loss_sum(self, hidden: torch.Tensor, weight: DTensor, labels: torch.Tensor,
                 chunk_bytes: int | None = None) -> torch.Tensor:
        """``causal_lm_loss_sum(logits, labels)`` of this rank's rows (``model/loss.py``), the logits never whole."""
        w, tied = self._head_local(weight)
        flat, targets = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        sizes = self.sizes(len(targets))
        every = _GatherRows.apply(flat, self, sizes)
        targets = self.gather(targets, sizes)
        own = torch.zeros(len(targets), dtype=torch.bool)
        start = sum(sizes[:self.index])
        own[start:start + sizes[self.index]] = True
        chunk = chunk_positions(self.rows, chunk_bytes)  # the same on every rank: the collectives line up
        if len(targets) <= chunk:
            return self._chunk_loss(every, targets, own, w, tied)
        return functools.reduce(operator.add, in_chunks(self._chunk_loss, (every, targets, own), chunk, w, tied))

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor, own: torch.Tensor, w: torch.Tensor,
                    tied: _TiedGrad | None = None) -> torch.Tensor:
        compute = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else w.dtype
        return _CrossEntropy.apply(_Head.apply(hidden, w, compute, tied), targets, own, self)

    def _head_local(self, weight: DTensor) -> tuple[torch.Tensor, _TiedGrad | None]:
        """The head's local rows and, when it is the embedding this forward looked up in, the lookup's own tensor
        and their shared gradient buffer (once: one head per lookup)."""
        tied, self._tied = self._tied, None
        if tied is not None and tied[0] is weight and torch.is_grad_enabled():
            return tied[1], tied[2]
        return self._local(weight), None

    def _local(self, weight: DTensor) -> torch.Tensor:
        return weight.to_local(grad_placements=self.grad_placements)

    def token_logps(self, hidden: torch.Tensor, weight: DTensor, targets: torch.Tensor, with_entropy: bool = False,
                    chunk_bytes: int | None = None):
        """(Log-probs of ``targets``, entropies or None) of this rank's rows, the weight never gathered."""
        w, tied = self._head_local(weight)
        return vocab_logps.token_logps(self, hidden, w, targets, with_entropy, chunk_bytes, _GatherRows.apply,
                                       lambda h, w, compute: _Head.apply(h, w, compute, tied))

    # ---- collectives of rows of any count per rank -------------------------------------------
    def sizes(self, n: int) -> list[int]:
        out = torch.empty(self.size, dtype=torch.long)
        dist.all_gather_single(out, torch.tensor([n]), group=self.group)
        return out.tolist()

    def gather(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every rank's ``x`` (``sizes[r]`` rows on rank r), concatenated in rank order."""
        most = max(sizes)
        padded = x.new_zeros((most, *x.shape[1:]))
        padded[:len(x)] = x
        out = x.new_empty((self.size * most, *x.shape[1:]))
        dist.all_gather_single(out, padded, group=self.group)
        return torch.cat([out[r * most: r * most + n] for r, n in enumerate(sizes)])

    def scatter_sum(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """This rank's rows of ``x`` (laid out as ``gather`` returns them), summed over the ranks."""
        most = max(sizes)
        padded = x.new_zeros((self.size * most, *x.shape[1:]))
        at = 0
        for r, n in enumerate(sizes):
            padded[r * most: r * most + n] = x[at:at + n]
            at += n
        out = x.new_empty((most, *x.shape[1:]))
        dist.reduce_scatter_single(out, padded, group=self.group)
        return out[:sizes[self.index]]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shard: VocabShard, sizes: list[int]):
        ctx.shard, ctx.sizes = shard, sizes
        return shard.gather(x, sizes)

    @staticmethod
    def backward(ctx, grad):
        return ctx.shard.scatter_sum(grad.contiguous(), ctx.sizes), None, None


class _TiedGrad:
    """A tied embedding shard's gradient of one forward: the head's backward writes (then adds) its gradient here,
    and the lookup's backward, which comes after every head's, adds its rows and hands the buffer to autograd."""

    __slots__ = ("grad",)

    def __init__(self) -> None:
        self.grad: torch.Tensor | None = None


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, tokens, shard: VocabShard, tied: _TiedGrad | None = None):
        flat = tokens.reshape(-1)
        sizes = shard.sizes(len(flat))
        ids = shard.gather(flat, sizes) - shard.lo
        inside = (ids >= 0) & (ids < weight.shape[0])
        rows = weight.new_zeros(len(ids), weight.shape[1])
        rows[inside] = weight[ids[inside]]
        ctx.save_for_backward(ids, inside)
        ctx.shard, ctx.sizes, ctx.shape, ctx.tied = shard, sizes, weight.shape, tied
        return shard.scatter_sum(rows, sizes).view(*tokens.shape, weight.shape[1])

    @staticmethod
    def backward(ctx, grad):
        ids, inside = ctx.saved_tensors
        grads = ctx.shard.gather(grad.reshape(-1, grad.shape[-1]).contiguous(), ctx.sizes)
        tied = ctx.tied
        out = tied.grad if tied is not None and tied.grad is not None else grads.new_zeros(ctx.shape)
        if tied is not None:
            tied.grad = None  # autograd owns it now
        out.index_add_(0, ids[inside], grads[inside])
        return out, None, None, None


class _Head(torch.autograd.Function):
    """``F.linear(hidden, weight)`` under autocast, without keeping autocast's copy of the weight: the rows are cast
    to the compute dtype a block at a time, in the forward and again in the backward. ``F.linear`` would save the
    whole copy for the backward (a worker's quarter of Qwen2.5-0.5B's embedding: 68 MB of bf16, most of what
    stood between a LoRA step and issue 25's floor at 24 layers, ``bench/memory.py``). The logits are the same
    (each is one dot product of bf16 operands); the hidden states' gradient is accumulated in float32 over the
    blocks without rounding it to bf16 in between, where ``F.linear``'s rounds the sum once."""

    BLOCK_BYTES = 8 * 2**20  # rows cast at a time

    @staticmethod
    def forward(ctx, hidden, weight, compute: torch.dtype, tied: _TiedGrad | None = None):
        ctx.save_for_backward(hidden, weight)
        ctx.compute, ctx.tied = compute, tied
        h = hidden.to(compute)
        return torch.cat([h @ block.to(compute).T for block in _Head.blocks(weight, compute)], dim=-1)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight = ctx.saved_tensors
        compute = ctx.compute
        wide = torch.float32 if compute in (torch.float16, torch.bfloat16) else compute
        grad_hidden = torch.zeros(hidden.shape, dtype=wide) if ctx.needs_input_grad[0] else None
        tied = ctx.tied if ctx.needs_input_grad[1] else None
        fresh = tied is None or tied.grad is None  # else add into the gradient of the forward's other heads
        grad_weight = (torch.empty_like(weight) if fresh else tied.grad) if ctx.needs_input_grad[1] else None
        h, at = hidden.to(compute), 0
        for block in _Head.blocks(weight, compute):
            rows = slice(at, at + len(block))
            g = grad[:, rows].to(compute)
            at += len(block)
            if grad_hidden is not None:
                grad_hidden += g.to(wide) @ block.to(compute).to(wide)
            if grad_weight is not None and fresh:
                grad_weight[rows] = g.T @ h
            elif grad_weight is not None:
                grad_weight[rows] += g.T @ h
        if tied is not None:  # the lookup's backward returns it, with its own rows added
            tied.grad, grad_weight = grad_weight, None
        return None if grad_hidden is None else grad_hidden.to(hidden.dtype), grad_weight, None, None

    @staticmethod
    def blocks(weight: torch.Tensor, compute: torch.dtype) -> list[torch.Tensor]:
        rows = max(1, _Head.BLOCK_BYTES // max(1, weight.shape[1] * compute.itemsize))
        return list(weight.split(rows)) or [weight]


class _CrossEntropy(torch.autograd.Function):
    """Sum of the cross-entropies of the ``own`` positions, from this rank's vocabulary range of every position's
    logits; -100 labels count nothing (``F.cross_entropy``'s ignore_index)."""

    @staticmethod
    def forward(ctx, logits, targets, own, shard: VocabShard):
        x, most = vocab_logps.global_max(logits, shard.group)
        ids = targets - shard.lo
        inside = (targets != -100) & (ids >= 0) & (ids < x.shape[-1])
        target = torch.zeros_like(most)
        target[inside] = x[inside, ids[inside]]
        exp = (x - most[:, None]).exp_()  # one [positions, rows] float32 buffer beside x, which goes now
        del x
        sums = torch.stack([exp.sum(-1), target])
        dist.all_reduce(sums, group=shard.group)
        valid = targets != -100
        losses = torch.where(valid, torch.log(sums[0]) + most - sums[1], 0.0)
        ctx.save_for_backward(exp, sums[0], ids, inside, valid & own)
        ctx.shard, ctx.dtype = shard, logits.dtype
        return losses[own].sum()

    @staticmethod
    def backward(ctx, grad):
        exp, total, ids, inside, counted = ctx.saved_tensors
        per = torch.where(counted, grad.to(exp.dtype), 0.0)  # this rank's positions carry its loss's gradient
        dist.all_reduce(per, group=ctx.shard.group)
        out = exp / total[:, None] * per[:, None]
        out[inside, ids[inside]] -= per[inside]
        return out.to(ctx.dtype), None, None, None


def vocab_weights(stage: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of the stage's vocabulary-sized weights: the embedding, and an untied LM head unless
    LoRA adapts it (its adapter's forward needs the whole weight: FSDP keeps gathering that one)."""
    found = []
    if stage.model.embed_tokens is not None:
        found.append((stage.model.embed_tokens, "weight"))
    if type(stage.lm_head) is CastLinear:
        found.append((stage.lm_head, "weight"))
    return found


def shard_vocabulary(stage: nn.Module, mesh: DeviceMesh) -> set[nn.Parameter]:
    """Place the stage's vocabulary-sized weights as FSDP would (Shard(0) over fsdp, replicated over dp) and give
    the stage the ops that use them so (``stage.vocab``); returns them, for ``fully_shard(ignored_params=...)``.
    Call before FSDP wraps the stage, on its meta parameters."""
    held = vocab_weights(stage)
    if not held:
        return set()
    head = stage.last and (stage.lm_head is None or type(stage.lm_head) is CastLinear)
    shard = VocabShard(mesh, stage.cfg.vocab_size, head)
    placed = set()
    for module, attr in held:
        param = getattr(module, attr)
        new = nn.Parameter(distribute_tensor(param, mesh, shard.placements, src_data_rank=None),
                           requires_grad=param.requires_grad)
        setattr(module, attr, new)
        placed.add(new)
    stage.vocab = shard
    return placed
