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
- ``shared_mesh_slices``: one DeviceMesh per slice during an engine build (``DeviceMesh.__getitem__`` and
  ``DeviceMesh._concatenate``, patched for the duration of a block);
- ``new_gloo_group``, ``set_default_group``, ``destroy_group``: gloo groups formed without a default group,
  so that the next placement's groups form while the current one trains (``_new_process_group_helper``,
  ``_world.pg_group_ranks``, ``_update_default_pg``);
- ``default_group_on_this_thread``: a thread's own view of the default group (``_World.default_pg``), so that
  a skeleton built in the background sees the ranks of its own placement;
- ``mesh_over_groups``: a DeviceMesh over given groups at a given rank (``DeviceMesh(_init_backend=False,
  _rank=...)``, ``_dim_group_names``, ``_pg_registry``);
- ``meshes_differ_by_group``: DeviceMesh equality that includes the mesh's process groups (``_hash_key``).
"""

from __future__ import annotations

import contextlib
import datetime
import threading
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


# ---- groups that outlive the default group -------------------------------------------------------

def new_gloo_group(store, rank: int, size: int, name: str, global_ranks: list[int],
                   timeout: datetime.timedelta):
    """A registered gloo ProcessGroup over ``store`` (``rank`` of ``size``), created whether or not a default
    group exists. ``global_ranks[i]`` is group rank i's rank in its placement's world.

    Why private: ``dist.new_group`` makes subgroups of the *current* default group and is collective over it.
    The next placement's world (other members, other ranks) must form while the current one still trains on
    the default group, so each group is made the way ``init_process_group`` makes the default one
    (``_new_process_group_helper`` with no parent ranks), then told its members' world ranks.
    """
    from torch.distributed import distributed_c10d as c10d

    pg, _ = c10d._new_process_group_helper(size, rank, [], c10d.Backend.GLOO, store, name, timeout=timeout,
                                           group_desc=name)
    c10d._world.pg_group_ranks[pg] = {g: i for i, g in enumerate(global_ranks)}
    return pg


def set_default_group(pg) -> None:
    """Make ``pg`` (a world group from ``new_gloo_group``, or None) the process's default group.

    Why private: there is no public way to switch the default group between two live worlds. Everything that
    asks c10d for "the" world (``get_rank()``, ``all_gather_object`` without a group) then sees the placement
    that trains.
    """
    from torch.distributed import distributed_c10d as c10d

    c10d._update_default_pg(pg)


def destroy_group(pg) -> None:
    """Shut ``pg`` down and drop it from c10d's tables, leaving every other group (and the default) alone."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if c10d._world.default_pg is pg:
        c10d._update_default_pg(None)
    try:
        dist.destroy_process_group(pg)
    except Exception:  # a group whose peer died can fail to shut down: forget it by hand
        for table in ("pg_map", "pg_names", "pg_group_ranks", "pg_backend_config", "pg_coalesce_state"):
            getattr(c10d._world, table).pop(pg, None)
        with contextlib.suppress(Exception):
            c10d._unregister_process_group(pg.group_name)


_THREAD_WORLD = threading.local()
_WORLD_PATCHED = False


def _patch_default_pg() -> None:
    global _WORLD_PATCHED
    if _WORLD_PATCHED:
        return
    from torch.distributed import distributed_c10d as c10d

    prop = c10d._World.__dict__["default_pg"]

    def getter(self):
        override = getattr(_THREAD_WORLD, "pg", None)
        return override if override is not None else prop.fget(self)

    c10d._World.default_pg = property(getter, prop.fset)
    _WORLD_PATCHED = True


@contextlib.contextmanager
def default_group_on_this_thread(pg) -> Iterator[None]:
    """Within the block, on this thread only, c10d's default group is ``pg``.

    Why private: a skeleton for the next placement is built on a background thread while the compute thread
    trains on the current default group. DeviceMesh slicing, FSDP and the pipeline stages ask c10d for the
    global rank (``get_rank()``); on the build thread it must be the rank in the *next* placement. c10d keeps
    the default group in ``_World.default_pg``; the patch (installed once) lets a thread-local value shadow it.
    Other threads see the real default throughout.
    """
    _patch_default_pg()
    previous = getattr(_THREAD_WORLD, "pg", None)
    _THREAD_WORLD.pg = pg
    try:
        yield
    finally:
        _THREAD_WORLD.pg = previous


def mesh_over_groups(groups: list, mesh: torch.Tensor, names: tuple[str, ...], rank: int) -> DeviceMesh:
    """A DeviceMesh over ``groups`` (one per dimension, each containing ``rank``), ``rank`` being this process's
    rank in ``mesh``.

    Why private: ``DeviceMesh.from_group`` takes the rank from the current default group, which during a
    background build is the *previous* placement's.
    """
    out = DeviceMesh("cpu", mesh, mesh_dim_names=names, _init_backend=False, _rank=rank)
    out._dim_group_names = [g.group_name for g in groups]
    for g in groups:
        out._pg_registry[g.group_name] = g
    return out


_TORCH_MESH_EQ = None  # torch's DeviceMesh.__eq__ and _hash_key once patched


def meshes_differ_by_group() -> None:
    """From now on, two DeviceMeshes are equal only if they also use the same process groups (installed once).

    Why private: DeviceMesh equality is the ranks, shape and names only, and DTensor's sharding caches are keyed
    by it. With several live worlds of the same shape (this placement, a cached one, the fallback for a lost
    worker) a cache hit would hand a DTensor another world's mesh, and its collectives would run on the wrong
    group. Including ``_dim_group_names`` (unique per group) in ``_hash_key`` and ``__eq__`` keeps them apart,
    so the caches need not be emptied on every switch.
    """
    global _TORCH_MESH_EQ
    if _TORCH_MESH_EQ is not None:
        return
    hash_key = DeviceMesh.__dict__["_hash_key"]
    eq = DeviceMesh.__dict__["__eq__"]
    _TORCH_MESH_EQ = (eq, hash_key)  # torch's own, for the shim's test

    def _hash_key(self):
        return (*hash_key(self), tuple(getattr(self, "_dim_group_names", ())))

    def __eq__(self, other):  # noqa: N807
        return eq(self, other) and (self is other or tuple(getattr(self, "_dim_group_names", ())) ==
                                    tuple(getattr(other, "_dim_group_names", ())))

    DeviceMesh._hash_key = _hash_key
    DeviceMesh.__eq__ = __eq__
