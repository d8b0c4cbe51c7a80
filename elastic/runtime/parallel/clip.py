"""Global gradient-norm clipping across DTensor shards, plain replicas and pipeline stages.

Each gradient contributes the sum of squares of the part this rank holds. Contributions are
summed over the mesh dimensions the gradient is sharded on (never over replicated ones, which
would count a replica twice), then over pipeline stages. The result equals the single-process
norm up to summation order.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from elastic.runtime.torch_compat import is_strided_shard


def _sharded_dims(grad: torch.Tensor) -> tuple[tuple[str, ...], object]:
    if not isinstance(grad, DTensor):
        return (), None
    mesh = grad.device_mesh
    # A strided shard (FSDP over a tensor-parallel shard) is a split too, but is_shard() is False for it.
    dims = tuple(mesh.mesh_dim_names[i] for i, p in enumerate(grad.placements) if p.is_shard() or is_strided_shard(p))
    return dims, mesh


SQUARE_CHUNK = 1 << 20  # elements squared at a time in float64: 8 MB


def _square_sum(t: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """The sum of ``t``'s squares in float64, a chunk at a time through ``buffer`` (``SQUARE_CHUNK`` float64s, reused
    for every chunk of every gradient). A float64 copy of the whole tensor and its square would be four times its
    float32 bytes (545 MB for a worker's quarter of Qwen2.5-0.5B's embedding gradient, ``bench/memory.py``); fresh
    8 MB temporaries per chunk are each a new mmap under the worker's 1 MiB mmap threshold (``runtime/heap.py``),
    zero-filled page by page: 11% of a full fine-tuning step of that model at fsdp=4 went to their page faults."""
    total = torch.zeros((), dtype=torch.float64)
    for chunk in t.detach().reshape(-1).split(SQUARE_CHUNK):
        if chunk.dtype != torch.float64:
            chunk = buffer[:len(chunk)].copy_(chunk)
        total += torch.dot(chunk, chunk)
    return total


@torch.no_grad()
def clip_grad_norm_(params: list[torch.Tensor], max_norm: float,
                    pp_group: dist.ProcessGroup | None = None) -> float:
    """Scale gradients so their global norm is at most ``max_norm`` (0: only measure). Returns the norm."""
    grads = [p.grad for p in params if p.grad is not None]
    buckets: dict[tuple[str, ...], list] = defaultdict(list)
    meshes = {}
    buffer = torch.empty(SQUARE_CHUNK, dtype=torch.float64)
    for g in grads:
        dims, mesh = _sharded_dims(g)
        local = g.to_local() if isinstance(g, DTensor) else g
        buckets[dims].append(_square_sum(local, buffer))
        meshes.setdefault(dims, mesh)
    total = torch.zeros((), dtype=torch.float64)
    for dims, parts in buckets.items():
        part = torch.stack(parts).sum()
        for dim in dims:
            dist.all_reduce(part, group=meshes[dims].get_group(dim))
        total += part
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    norm = math.sqrt(float(total))
    if max_norm > 0:
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for g in grads:
                (g.to_local() if isinstance(g, DTensor) else g).mul_(coef)
    return norm
