"""A placement's process groups as one object that can be formed ahead of time and kept.

``LayoutGroups`` holds the gloo world of one placement and the group of each mesh dimension (pp, dp, fsdp,
tp) that contains this rank, and the DeviceMesh over them. Unlike ``init_process_group`` groups, several
can be alive at once: the one that trains, the next placement's (formed in the background while training
goes on), the fallback for a lost worker, and recently used ones (so that A -> B -> A forms nothing).
``activate`` makes a set's world the default group, which is all that switching costs.

Groups rendezvous through the driver's TCPStore under the set's name, through an ``AbortableStore`` (the
driver calls off a rendezvous whose member died), and their gloo sockets are tracked under the set's name
(``abort.GlooSockets``), so that a failure cuts the groups that were in use and leaves idle ones alone.

Assumes the caller forms a set on one thread at a time per process, and that the members of a set form
it in the same order relative to their other sets (the driver sends them in one order).
"""

from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from elastic.core.layout import DIMS, Layout
from elastic.runtime.parallel.abort import GlooSockets
from elastic.runtime.parallel.connections import CONNECT_TIMEOUT_S
from elastic.runtime.parallel.store import AbortableStore
from elastic.runtime.torch_compat import (
    default_group_on_this_thread,
    destroy_group,
    mesh_over_groups,
    meshes_differ_by_group,
    new_gloo_group,
    set_default_group,
)

log = logging.getLogger(__name__)
meshes_differ_by_group()  # several worlds of one shape may be alive: their meshes must not compare equal


def _rows(layout: Layout, dim: int) -> list[list[int]]:
    """The rank lists of mesh dimension ``dim``: ranks that differ only in that coordinate."""
    grid = torch.arange(layout.world).reshape(layout.shape)
    return grid.movedim(dim, -1).reshape(-1, layout.shape[dim]).tolist()


class LayoutGroups:
    def __init__(self, store: dist.Store, name: str, rank: int, layout: Layout, timeout_s: float,
                 sockets: GlooSockets, collective_timeout_s: float | None = None) -> None:
        """Form (blocking until every member arrives, at most ``timeout_s``) the world and this rank's dimension
        groups; their collectives time out after ``collective_timeout_s`` (default: ``timeout_s``)."""
        self.name, self.rank, self.layout, self._sockets = name, rank, layout, sockets
        timeout = datetime.timedelta(seconds=collective_timeout_s or timeout_s)
        prefixed = AbortableStore(dist.PrefixStore(name, store), timeout_s)
        self.world = self.dims = None
        self._groups: list = []
        try:
            with sockets.track(prefixed, name, rank, layout.world, timeout_s):
                self.world = self._group(prefixed, "world", list(range(layout.world)), timeout)
                self.dims = []
                for d, dim in enumerate(DIMS):
                    row_index, row = next((i, r) for i, r in enumerate(_rows(layout, d)) if rank in r)
                    self.dims.append(self._group(prefixed, f"{dim}{row_index}", row, timeout))
        except BaseException:  # a member died or the driver called it off: leave no half-formed set behind
            self.close()
            raise
        grid = torch.arange(layout.world, dtype=torch.int).reshape(layout.shape)
        self.mesh: DeviceMesh = mesh_over_groups(self.dims, grid, DIMS, rank)

    def _group(self, store, label: str, ranks: list[int], timeout: datetime.timedelta):
        """Connected within ``CONNECT_TIMEOUT_S`` of every member's arrival, then given the collective timeout."""
        connect = datetime.timedelta(seconds=CONNECT_TIMEOUT_S)
        pg = new_gloo_group(store, ranks.index(self.rank), len(ranks), f"{self.name}/{label}", ranks, connect)
        self._groups.append(pg)
        pg.set_timeout(timeout)
        return pg

    def activate(self) -> None:
        """Make this set's world the default group (what ``get_rank()`` and group-less collectives use)."""
        set_default_group(self.world)

    def as_default_here(self):
        """A block in which, on this thread only, this set's world is the default group (background builds)."""
        return default_group_on_this_thread(self.world)

    def close(self) -> None:
        """Destroy every group of the set (and forget its sockets); other sets are untouched."""
        for pg in reversed(self._groups):
            destroy_group(pg)
        self._groups = []
        self._sockets.forget(self.name)
