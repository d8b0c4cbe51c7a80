"""Build each DeviceMesh slice once while an engine is being built.

FSDP2 (torch 2.13) slices the data-parallel mesh, and under tensor parallelism concatenates it
with the tp mesh, once for *every parameter* it wraps, and each slice constructs a new DeviceMesh
(about 2 ms of Python here). An engine rebuild is the floor of every live reshard, and a LoRA
model has two extra parameters per adapted projection, so these slices cost a large share of a
reshard. Within ``shared_mesh_slices()``, asking the same mesh for the same slice (or the same
meshes for the same concatenation) returns the DeviceMesh built the first time.

This is sound because a slice is a pure function of its parent mesh and the dimension names, and
DeviceMesh objects are not mutated after construction. The patch is scoped to the block and
restores torch's own methods on exit. Engines are built on a worker's one compute thread (see
``worker.py``), and no other thread of the process slices meshes meanwhile. If a torch version
lacks either method, that method is left alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch.distributed.device_mesh import DeviceMesh


@contextlib.contextmanager
def shared_mesh_slices() -> Iterator[None]:
    getitem = DeviceMesh.__dict__.get("__getitem__")
    concatenate = DeviceMesh.__dict__.get("_concatenate")
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

    if getitem is not None:
        DeviceMesh.__getitem__ = cached_getitem
    if isinstance(concatenate, staticmethod):
        DeviceMesh._concatenate = staticmethod(cached_concatenate)
    try:
        yield
    finally:
        if getitem is not None:
            DeviceMesh.__getitem__ = getitem
        if isinstance(concatenate, staticmethod):
            DeviceMesh._concatenate = concatenate
