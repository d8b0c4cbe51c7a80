"""Tensor parallelism with DTensor's Colwise/Rowwise styles, following the model's TP_PLAN.

Column-parallel projections (q, k, v, gate, up) split their output features and hand the
attention/MLP code local shards holding n_heads/tp heads; row-parallel ones (o, down) split
their input features and all-reduce their output. Embedding, norms and the LM head stay
replicated (small with a byte vocabulary). LoRA adapters follow their base layer's split:

- column-parallel base: A replicated, B split on its output (like the base);
- row-parallel base: A split on its input (like the base), B replicated. A's partial products are
  summed by the same all-reduce as the base layer's: B (sum_i A_i x_i) = sum_i B A_i x_i, so the
  adapter adds no communication.

LoRA dropout draws each row's full mask; ``mask_like_input`` places it like the adapter's input (a
DTensor here: replicated before a column-parallel layer, split on its features before a row-parallel
one), locally, with no communication, so every rank multiplies its slice by its slice of the mask.

The per-head q/k norms (Qwen3) stay whole on every tp rank, but each rank applies them only to
its own heads, so each rank's weight gradient is a partial sum over heads. ``sum_grad_over`` makes
the weight's backward an all-reduce over tp (Megatron's "copy to tensor-parallel region"); the
forward is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from elastic.model.llama import TP_PLAN
from elastic.model.lora import LoRALinear
from elastic.runtime.torch_compat import placed_linear_style

PLAIN = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
LORA_PLACEMENTS = {  # "" is the base weight; lora_A / lora_B the adapter's child modules
    "colwise": {"": Shard(0), "lora_A": Replicate(), "lora_B": Shard(0)},
    "rowwise": {"": Shard(1), "lora_A": Shard(1), "lora_B": Replicate()},
}


def mask_like_input(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The full dropout ``mask`` placed as the input ``x`` is: this rank's slice of it (no communication)."""
    if not isinstance(x, DTensor):
        return mask
    return distribute_tensor(mask, x.device_mesh, x.placements, src_data_rank=None)


def apply_tensor_parallel(stage: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, str] = TP_PLAN) -> None:
    for layer in stage.model.layers.values():
        styles = {}
        for path, style in plan.items():
            module = layer.get_submodule(path)
            if isinstance(module, LoRALinear):
                module.mask_hook = mask_like_input
                styles[path] = placed_linear_style(PLAIN[style], LORA_PLACEMENTS[style])
            else:
                styles[path] = PLAIN[style]()
        parallelize_module(layer, tp_mesh, styles)
    apply_head_norm_grad_sum(stage, tp_mesh)


class _SumGradOver(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over ``group``."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_grad_over(group):
    """A ``RMSNorm.weight_hook`` that sums the weight's gradient over ``group``'s ranks."""
    return lambda weight: _SumGradOver.apply(weight, group)


def apply_head_norm_grad_sum(stage: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Per-head q/k norms: sum their gradient over tp (see the module docstring)."""
    hook = sum_grad_over(tp_mesh.get_group())
    for layer in stage.model.layers.values():
        if layer.self_attn.q_norm is not None:
            layer.self_attn.q_norm.weight_hook = hook
            layer.self_attn.k_norm.weight_hook = hook
