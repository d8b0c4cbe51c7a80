"""Process groups for a placement: the default gloo group, its DeviceMesh, and abort.

A worker joins one default group per placement (destroyed and re-created on every reshard; the
process itself keeps running). Groups rendezvous through a TCPStore hosted by the driver, under
a fresh key prefix per group, so old and new groups never collide, and through an
``AbortableStore`` so the driver can call off a rendezvous whose member died. Every gloo socket a group
opens is tracked (``abort.GlooSockets``) so that ``abort_groups`` can release blocked peers at once.
"""

from __future__ import annotations

import datetime
import logging

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from elastic.core.layout import DIMS, Layout
from elastic.runtime.parallel.abort import GlooSockets
from elastic.runtime.parallel.store import AbortableStore
from elastic.runtime.torch_compat import clear_dtensor_caches, reset_group_registry

log = logging.getLogger(__name__)

_STORES: dict[tuple[str, int], dist.TCPStore] = {}
SOCKETS = GlooSockets()


def store_client(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A cached client connection to the driver's TCPStore."""
    key = (host, port)
    if key not in _STORES:
        _STORES[key] = dist.TCPStore(host, port, is_master=False,
                                     timeout=datetime.timedelta(seconds=timeout_s), use_libuv=True)
    return _STORES[key]


def form_layout_group(store: dist.Store, name: str, rank: int, layout: Layout, timeout_s: float) -> DeviceMesh:
    """Join the default gloo group ``name`` as ``rank`` and build the (pp, dp, fsdp, tp) CPU mesh."""
    leave_default_group()
    prefixed = AbortableStore(dist.PrefixStore(name, store), timeout_s)
    with SOCKETS.track(prefixed, "layout", rank, layout.world, timeout_s):
        dist.init_process_group("gloo", store=prefixed, rank=rank, world_size=layout.world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        return build_mesh(layout)


def build_mesh(layout: Layout) -> DeviceMesh:
    """The 4-D CPU mesh (pp, dp, fsdp, tp) over the default group; rank order as in layout.py."""
    return init_device_mesh("cpu", layout.shape, mesh_dim_names=DIMS)


def standalone_group(store: dist.Store, name: str, rank: int, world: int, timeout_s: float) -> dist.ProcessGroup:
    """A gloo group outside the default-group registry, tracked under ``name`` (reshard transfers)."""
    prefixed = AbortableStore(dist.PrefixStore(name, store), timeout_s)
    with SOCKETS.track(prefixed, name, rank, world, timeout_s):
        return dist.ProcessGroupGloo(prefixed, rank, world, datetime.timedelta(seconds=timeout_s))


def close_standalone(name: str) -> None:
    SOCKETS.forget(name)


def abort_groups(name: str | None = None) -> int:
    """Cut the gloo connections of group ``name`` (None: every group of this process).

    Blocked operations on them fail at once, here and on the peers.
    """
    return SOCKETS.cut(name)


def leave_default_group() -> None:
    """Destroy the default group and its subgroups, and the caches that refer to them."""
    clear_dtensor_caches()
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as err:  # a broken group can fail to tear down; then reset the registry by hand
            log.warning("destroy_process_group failed (%s); resetting the group registry", err)
            reset_group_registry()
    SOCKETS.forget("layout")
