"""This process's gloo connections: its client of the driver's store, the default group, standalone
groups, and cutting groups when something fails.

A placement's groups are a ``groups.LayoutGroups`` (several may be alive at once; the one that trains is the
default group). Groups rendezvous through a TCPStore hosted by the driver, under a fresh key prefix per
group, so old and new groups never collide, and through an ``AbortableStore`` so the driver can call off a
rendezvous whose member died. Every gloo socket a group opens is tracked (``abort.GlooSockets``) so that
``abort_groups`` can release blocked peers at once.
"""

from __future__ import annotations

import datetime
import logging

import torch.distributed as dist

from elastic.runtime.parallel.abort import GlooSockets
from elastic.runtime.parallel.store import AbortableStore
from elastic.runtime.torch_compat import set_default_group as _set_default

log = logging.getLogger(__name__)

_STORES: dict[tuple[str, int], dist.TCPStore] = {}
SOCKETS = GlooSockets()
# How long gloo may take to connect a group once every member has published its address (arriving is the
# store's wait, abortable and as long as the rendezvous timeout). Every listener then exists, so connecting is
# a TCP handshake and a read by the peer's loop thread: milliseconds, seconds on a machine at load 60. A member
# that died after publishing cannot be called off (gloo's connect does not watch the store, and shutting its
# listener terminates the process), so this bounds how long the others wait for it: gloo retries, measured at
# about five times this value (10 s for 2, 25 s for 5; the collective timeout of 3,600 s before).
CONNECT_TIMEOUT_S = 10.0


def store_client(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A cached client connection to the driver's TCPStore."""
    key = (host, port)
    if key not in _STORES:
        _STORES[key] = dist.TCPStore(host, port, is_master=False,
                                     timeout=datetime.timedelta(seconds=timeout_s), use_libuv=True)
    return _STORES[key]


def set_default_group(world) -> None:
    """Make a placement's world (``LayoutGroups.world``) the default group; None: no default group."""
    _set_default(world)


def standalone_group(store: dist.Store, name: str, rank: int, world: int, timeout_s: float) -> dist.ProcessGroup:
    """A gloo group outside the default-group registry, tracked under ``name`` (reshard transfers)."""
    prefixed = AbortableStore(dist.PrefixStore(name, store), timeout_s)
    with SOCKETS.track(prefixed, name, rank, world, timeout_s):
        pg = dist.ProcessGroupGloo(prefixed, rank, world, datetime.timedelta(seconds=CONNECT_TIMEOUT_S))
    pg.set_timeout(datetime.timedelta(seconds=timeout_s))  # the collectives' timeout, once connected
    return pg


def close_standalone(name: str) -> None:
    SOCKETS.forget(name)


def abort_groups(name: str | None = None, keep: set[str] = frozenset()) -> int:
    """Cut the gloo connections of group ``name`` (None: every group of this process but those in ``keep``).

    Blocked operations on them fail at once, here and on the peers.
    """
    return SOCKETS.cut(name, exclude=keep)
