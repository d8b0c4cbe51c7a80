"""Mixed precision (``train.mixed_precision = "bf16"``): bf16 compute over float32 master state.

The stage's ``forward`` runs under ``torch.autocast("cpu", dtype=torch.bfloat16)``, on every layout: the
matmuls (linear, attention) take bf16 copies of their float32 inputs and weights and return bf16; everything
else (embedding, RMSNorm, the residual adds, the loss, which upcasts its logits) stays in float32. Autograd
runs each op's backward in the dtype its forward used, so the weight gradients arrive in float32 (the
backward of autocast's cast), and everything after the backward sees only float32: gradient accumulation,
FSDP's reduce-scatter and all-reduce, clipping, AdamW and its moments, reshards, snapshots and checkpoints.

Why autocast on every layout, and not FSDP2's ``MixedPrecisionPolicy`` where the engine wraps with
``fully_shard`` (docs/design.md, item 40): one semantics for every layout, so that a live reshard
from an FSDP layout to a tp or pp one (which FSDP does not wrap) does not change the math mid-run, and so that
every layout is the single-process autocast run's up to summation order. The policy computes the whole layer
in bf16, the residual stream included, which measured as far from the autocast run as float32 is.

Under a pipeline the stage's output is the float32 residual stream, so the activations and their gradients
that travel between stages are float32 on every stage, in the schedule's shape inference too (it calls the
same forward). The cast cache is off (``cache_enabled=False``): a cached bf16 copy of an FSDP-gathered
weight would live until the forward ends, whatever ``reshard_after_forward`` frees; each weight is used once
per forward, so nothing is cast twice. Nor does autograd keep the copies until the backward: the model's linears
are ``model/cast_linear.py``'s, which save the float32 weight (freed by FSDP after the forward, gathered again for
the backward) and cast it again there, with the same values as autocast's ``F.linear``. Assumes CPU tensors.

Frozen matmul weights (LoRA's base) are stored in bf16 (``store_in_bf16``, chosen by
``model/specs.stored_in_bf16``): autocast's cast of such a weight is then a no-op, returning the parameter
itself, so FSDP gathers bf16 and autograd saves the gathered parameter (which FSDP frees after the forward
and gathers again for the backward) instead of keeping a bf16 copy. The engine rounds them once when it
loads them (round-to-nearest-even, as autocast's cast) and hands them out as float32 (exact), so the state
that reshards, snapshots, checkpoints and exports move is float32 as before.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

COMPUTE_DTYPE = {"bf16": torch.bfloat16}


def autocast(mode: str):
    """The block a ``mode`` forward runs in (``train.mixed_precision``; "no": no autocast)."""
    return torch.autocast("cpu", dtype=COMPUTE_DTYPE.get(mode, torch.bfloat16), enabled=mode != "no",
                          cache_enabled=False)


def store_in_bf16(module: nn.Module, names: set[str]) -> None:
    """Make the parameters of ``module`` named in ``names`` bf16 Parameters (on any device, before any wrapping;
    names it does not hold are skipped). Found by identity: a wrapper may rename what ``named_parameters`` shows."""
    wanted = {id(p) for name, p in module.named_parameters() if name in names}
    made: dict[int, nn.Parameter] = {}  # one new Parameter per old one, wherever it is registered
    for sub in module.modules():
        for attr, p in list(sub.named_parameters(recurse=False, remove_duplicate=False)):
            if id(p) in wanted:
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=p.requires_grad)
                setattr(sub, attr, made[id(p)])


def apply_mixed_precision(module: nn.Module, mode: str) -> None:
    """Make ``module``'s forward (hence every call of it: training, pipeline stages, evaluation, sampling) run in
    ``autocast(mode)``; "no" leaves it as it is. FSDP's hooks run around ``forward``, outside the block."""
    if mode == "no":
        return
    forward = module.forward

    @functools.wraps(forward)
    def mixed_forward(*args, **kwargs):
        with autocast(mode):
            return forward(*args, **kwargs)

    module.forward = mixed_forward
