"""A linear layer whose matmul under autocast keeps the float32 weight for its backward, not autocast's bf16 copy.

Under ``torch.autocast`` (``train.mixed_precision = "bf16"``, ``runtime/precision.py``) ``F.linear`` casts its
float32 weight to bf16 and autograd saves that copy until the layer's backward: with FSDP, the copy outlives the
gathered weight that FSDP frees after the forward, so every layer's copy is held at once at the turn from forward
to backward (716 MB a worker for the 494M Qwen2 shape at fsdp=4, 27% of a full fine-tuning step's peak,
``bench/memory.py``). ``cast_linear`` saves the weight itself (the parameter FSDP frees and gathers again for the
backward) and casts it again there: the same bf16 operands, hence the same matmuls, for one more cast per layer.

It applies where autocast would cast a plain float32 weight. Elsewhere (no autocast, a weight already bf16 such as
LoRA's frozen base, a tensor-parallel DTensor weight, whose ops DTensor dispatches) it is ``F.linear`` itself.
Assumes CPU autocast (the only device this project trains on). No distributed code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _autocast_dtype(weight: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast's matmuls would cast ``weight`` to, or None where they cast nothing of it (no autocast, a
    weight not float32) or where DTensor dispatches its ops (tensor-parallel weights)."""
    if not torch.is_autocast_enabled("cpu") or type(weight) not in (torch.Tensor, nn.Parameter):
        return None
    compute = torch.get_autocast_dtype("cpu")
    return compute if weight.dtype == torch.float32 and compute != torch.float32 else None


def cast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, without autograd keeping autocast's copy of ``weight``."""
    compute = _autocast_dtype(weight)
    if compute is None:
        return F.linear(x, weight, bias)
    return _CastLinear.apply(x, weight, bias, compute)


def cast_frozen(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` as autocast's matmuls would cast it, made once for the several matmuls of one forward (a chunked
    loss's or log-probs' head, ``model/loss.py``), or None where that does not apply: no autocast, a weight that is
    not a plain float32 tensor, or one that trains (its gradient must reach the float32 parameter: ``cast_linear``
    casts per call instead). ``F.linear(x, cast)`` under autocast then computes what ``cast_linear(x, weight)``
    does, bit for bit, without casting the weight again."""
    compute = None if weight.requires_grad else _autocast_dtype(weight)
    return None if compute is None else weight.detach().to(compute)


class CastLinear(nn.Linear):
    """``nn.Linear`` whose forward is ``cast_linear``: state-dict names and tensor-parallel styles are nn.Linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast_linear(x, self.weight, self.bias)


class _CastLinear(torch.autograd.Function):
    """y = cast(x) cast(W)^T + cast(b), each cast to ``compute`` as autocast casts a float32 operand; the backward
    runs the matmuls of ``F.linear``'s backward on the same bf16 operands and returns each gradient in its input's
    dtype, as the backward of autocast's cast does."""

    @staticmethod
    def forward(ctx, x, weight, bias, compute: torch.dtype):
        with torch.autocast("cpu", enabled=False):
            xc = x.to(compute) if x.dtype == torch.float32 else x
            out = F.linear(xc, weight.to(compute), None if bias is None else bias.to(compute))
        ctx.save_for_backward(xc, weight)
        ctx.compute, ctx.x_dtype = compute, x.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        xc, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        with torch.autocast("cpu", enabled=False):
            g = grad.to(ctx.compute)
            if ctx.needs_input_grad[0]:
                grad_x = (g @ weight.to(ctx.compute)).to(ctx.x_dtype)
            rows = g.reshape(-1, g.shape[-1])
            if ctx.needs_input_grad[1]:
                grad_w = (rows.T @ xc.reshape(-1, xc.shape[-1])).to(weight.dtype)
            if ctx.b_dtype is not None and ctx.needs_input_grad[2]:
                grad_b = rows.sum(0).to(ctx.b_dtype)
        return grad_x, grad_w, grad_b, None
