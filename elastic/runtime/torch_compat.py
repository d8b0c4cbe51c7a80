"""Every private torch API this project uses, in one place, each with the reason it is needed.

The shims were written against and are tested on torch 2.13 (``pyproject.toml`` pins that range).
``tests/dist/test_torch_compat.py`` has one test per shim that fails loudly, naming the shim, when a
torch release moves what it relies on. Nothing else in the package touches a private torch name; an
import-linter contract (``.importlinter``) keeps the worker's other modules from importing the private
modules used here.

The shims:
- ``local_tensor``: the storage-owning local shard of a DTensor (``DTensor._local_tensor``);
- ``is_strided_shard``: FSDP-over-tensor-parallel placements (``_StridedShard``);
- ``placed_linear_style``: tensor-parallel styles that place a LoRA adapter's tensors too
  (overrides ``ParallelStyle._partition_linear_fn``);
- ``clear_dtensor_caches``: DTensor's sharding-propagation caches (``torch._C`` and ``_op_dispatcher``);
- ``reset_group_registry``: c10d's group tables, after a failed ``destroy_process_group``;
- ``shared_mesh_slices``: one DeviceMesh per slice during an engine build (``DeviceMesh.__getitem__`` and
  ``DeviceMesh._concatenate``, patched for the duration of a block).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ParallelStyle

TESTED_TORCH = "2.13"  # the minor release these shims are tested on


# ---- DTensor internals -----------------------------------------------------------------------

def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores: a DTensor's local shard itself, or ``t``.

    Why private: the optimizer steps local shards as plain tensors and keys its state by tensor
    object. ``DTensor.to_local()`` returns a new view object on every call (through an autograd
    function), so only ``_local_tensor`` names the one tensor that owns the shard's storage.
    """
    return t._local_tensor if isinstance(t, DTensor) else t


def is_strided_shard(placement: object) -> bool:
    """Whether a DTensor placement is ``_StridedShard``: FSDP's shard of a tensor-parallel shard.

    Why private: global gradient-norm clipping must sum squares over every mesh dimension a gradient
    is split on. ``_StridedShard`` is such a split, but it is not a ``Shard`` subclass and
    ``is_shard()`` is False for it, and torch exposes it under no public name.
    """
    from torch.distributed.tensor.placement_types import _StridedShard

    return isinstance(placement, _StridedShard)


def placed_linear_style(style: type[ParallelStyle], placements: dict[str, object]) -> ParallelStyle:
    """An instance of the tensor-parallel ``style`` (ColwiseParallel or RowwiseParallel) that places each
    parameter of a module and of its named children as ``placements`` says: "" is the module's own
    weight, "lora_A" and "lora_B" its adapter's.

    Why private: the public styles shard only the module's own weight and bias. A LoRA adapter's A and
    B live in child modules and need placements of their own (see ``parallel/tensor.py``). The one
    hook torch calls per (sub)module while partitioning is ``_partition_linear_fn(name, module, mesh)``.
    """
    from torch.distributed.tensor import Replicate, distribute_tensor

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        if name not in placements:
            return
        for pname, param in list(module.named_parameters(recurse=False)):
            placement = placements[name]
            if pname == "bias" and getattr(placement, "dim", None) == 1:
                placement = Replicate()  # a row-parallel bias is added once, after the all-reduce (as torch's style)
            placed = distribute_tensor(param, device_mesh, [placement], src_data_rank=None)
            module.register_parameter(pname, nn.Parameter(placed, requires_grad=param.requires_grad))

    cls = type(f"Placed{style.__name__}", (style,), {"_partition_linear_fn": _partition_linear_fn})
    return cls()


def clear_dtensor_caches() -> None:
    """Forget DTensor's cached sharding decisions: they hold DeviceMesh objects of the old world.

    Why private: a new mesh of the same shape compares equal to an old one, so without this a cache hit
    hands DTensor a mesh whose process groups were destroyed ("Could not resolve the process group").
    Torch has no public call that empties these caches. Call on the thread that runs the model (the
    Python-level cache is thread-local).
    """
    torch._C._clear_DTensor_sharding_propagator_cache()
    propagator = DTensor._op_dispatcher.sharding_propagator
    propagator.propagate_op_sharding.cache_clear()
    propagator._propagate_tensor_meta_cached.cache_clear()


# ---- c10d internals --------------------------------------------------------------------------

_GROUP_TABLES = ("pg_map", "pg_names", "pg_group_ranks", "pg_backend_config", "pg_to_tag", "tags_to_pg",
                 "pg_coalesce_state")


def reset_group_registry() -> None:
    """Leave c10d as ``destroy_process_group`` would have: no default group, no names, group count 0.

    Why private: a group whose peer died can fail to tear down, and then c10d keeps its tables. The
    next world's groups would get names that collide with the stale ones. Torch offers no public reset.
    """
    from torch.distributed import distributed_c10d as c10d

    world = c10d._world
    c10d._update_default_pg(None)
    for table in _GROUP_TABLES:
        getattr(world, table).clear()
    c10d._unregister_all_process_groups()
    world.group_count = 0


# ---- DeviceMesh slicing ----------------------------------------------------------------------

@contextlib.contextmanager
def shared_mesh_slices() -> Iterator[None]:
    """Within the block, asking the same mesh for the same slice (or the same meshes for the same
    concatenation) returns the DeviceMesh built the first time.

    Why private: FSDP2 (torch 2.13) slices the data-parallel mesh, and under tensor parallelism
    concatenates it with the tp mesh, once for *every parameter* it wraps, and each slice constructs a
    new DeviceMesh (about 2 ms of Python here). An engine rebuild is the floor of every live reshard,
    so these slices are a large share of it. The only way to share them is to patch DeviceMesh's
    ``__getitem__`` and its private ``_concatenate``.

    Sound because a slice is a pure function of its parent mesh and the dimension names, and DeviceMesh
    objects are not mutated after construction. The patch is scoped to the block and torch's own methods
    come back on exit, errors included. Engines are built on a worker's one compute thread, and no other
    thread of the process slices meshes meanwhile.
    """
    getitem = DeviceMesh.__dict__["__getitem__"]
    concatenate = DeviceMesh.__dict__["_concatenate"]
    built: dict[tuple, DeviceMesh] = {}
    alive: list[DeviceMesh] = []  # keeps every keyed mesh alive, so that its id() stays unique

    def cached_getitem(self: DeviceMesh, names) -> DeviceMesh:
        key = ("slice", id(self), names if isinstance(names, str) else tuple(names))
        if key not in built:
            built[key] = getitem(self, names)
            alive.append(self)
        return built[key]

    def cached_concatenate(meshes: list[DeviceMesh]) -> DeviceMesh:
        key = ("concat", *(id(m) for m in meshes))
        if key not in built:
            built[key] = concatenate.__func__(meshes)
            alive.extend(meshes)
        return built[key]

    DeviceMesh.__getitem__ = cached_getitem
    DeviceMesh._concatenate = staticmethod(cached_concatenate)
    try:
        yield
    finally:
        DeviceMesh.__getitem__ = getitem
        DeviceMesh._concatenate = concatenate
