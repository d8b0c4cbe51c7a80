"""Data parallelism through FSDP2 ``fully_shard`` on a 2-D (dp, fsdp) mesh (HSDP).

dp replicates and fsdp shards parameters, gradients and optimizer state on dimension 0. One
mechanism covers pure replication (fsdp=1), pure sharding (dp=1) and both. Gradients are
*summed*, not averaged: callers normalise the loss by the global token count, so the reduced
gradient equals the single-process one for any split of the batch. Each unit's gradient reduce-scatter releases
its input buffer as soon as it returns (``_ReleasingReduceScatter``). Assumes CPU tensors (gloo).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard


def data_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The (dp, fsdp) sub-mesh of a layout's 4-D mesh, or just fsdp when nothing is replicated.

    The two are the same sharding, but FSDP slices a 2-D mesh anew for every parameter it wraps
    (about 2 ms each on this machine), which a 1-D mesh skips: a reshard rebuilds faster.
    """
    dp = mesh.size(mesh.mesh_dim_names.index("dp"))
    return mesh["fsdp"] if dp == 1 else mesh["dp", "fsdp"]


def apply_fsdp(stage: nn.Module, dp_mesh: DeviceMesh, reshard_after_forward: bool = True,
               ignored: set[nn.Parameter] | None = None) -> None:
    """Wrap each decoder layer, then the stage (the root: the tensors outside the layers), except ``ignored``:
    parameters placed by the caller (the vocabulary-sharded embedding and head, ``parallel/vocab.py``)."""
    for layer in stage.model.layers.values():
        fully_shard(layer, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    # Passed explicitly, also to the root: left to its default (None), FSDP2 keeps the root's parameters gathered
    # from the forward to the end of the backward, and the root may hold the (tied) embedding and LM head, the
    # largest tensor of a real model (545 MB of Qwen2.5-0.5B's float32 weights on every worker; bench/memory.py).
    fully_shard(stage, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored or None)
    for module in stage.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
            module.set_custom_reduce_scatter(_ReleasingReduceScatter())


class _ReleasingReduceScatter:
    """FSDP2's reduce-scatter of a unit's gradients (``set_custom_reduce_scatter``'s protocol: ``allocate`` and the
    call, as its default), freeing the input buffer when the call returns. FSDP2 keeps the last reduce-scatter's
    input alive until the next unit's (for a GPU stream still reading it): one layer's unsharded gradients beside
    the next layer's backward, and the first layer's until the backward ends (60 MB a worker at the 494M shape,
    fsdp=4, ``bench/memory.py``). On gloo the synchronous call has finished with it; nothing reads it after."""

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup, op,
                 async_op: bool = False):
        work = dist.reduce_scatter_single(output=output_tensor, input=input_tensor, group=group, op=op,
                                          async_op=async_op)
        if not async_op:
            input_tensor.untyped_storage().resize_(0)
        return work
