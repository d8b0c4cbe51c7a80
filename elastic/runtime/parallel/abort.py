"""Abort gloo groups by shutting down their TCP sockets.

Why this exists: gloo has no working abort. ``ProcessGroupGloo.abort()`` and ``shutdown()`` do
not release an operation blocked on a peer, and a group's sockets close only when its last
reference goes, which in-flight asynchronous work (FSDP prefetches, functional collectives on
other groups) can prevent. A rank blocked on a live-but-stuck peer would then wait out the full
collective timeout. torchft solves this by running gloo in a child process it can kill; we keep
gloo in-process and shut its sockets down instead, which makes every operation on them fail at
once, here and on the peer ("Connection closed by peer").

How gloo's sockets are found without touching anyone else's (Ray's gRPC, the TCPStore): every
gloo group opens one listening socket per rank while it is created. We note the listeners that
appear during creation, publish them through the group's store, and treat as gloo's exactly the
connections whose local end is one of our listeners (accepted) or whose remote end is a peer's
listener (connected). Linux only (``/proc``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import threading

log = logging.getLogger(__name__)

# tcp_info's first byte, tcpi_state (include/net/tcp_states.h).
_ESTABLISHED, _LISTEN = 1, 10
Endpoint = tuple[str, int]


def _endpoint(address: tuple) -> Endpoint:
    """(ip, port) of a socket address, an IPv4-mapped IPv6 address as its IPv4 one (both ends name it alike)."""
    ip = ipaddress.ip_address(address[0].split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (str(ip), int(address[1]))


def _socket_table() -> list[tuple[Endpoint, Endpoint | None, int, int]]:
    """(local, remote or None, TCP state, fd) for every TCP socket this process holds.

    Each of our own descriptors is asked directly (a duplicate of it, closed at once). Not by reading
    ``/proc/self/net/tcp``: that lists every TCP socket of the network namespace, which on a machine running
    many workers (each with its gloo pairs, Ray's gRPC, sockets in TIME_WAIT) is thousands of lines, and it was
    parsed twice per gloo group a worker formed."""
    rows = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        with contextlib.suppress(OSError):
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:["):
                continue
            with socket.socket(fileno=os.dup(fd)) as sock:
                if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
                    continue
                state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
                remote = _endpoint(sock.getpeername()) if state == _ESTABLISHED else None
                rows.append((_endpoint(sock.getsockname()), remote, state, fd))
    return rows


def listeners() -> set[Endpoint]:
    return {local for local, _, state, _ in _socket_table() if state == _LISTEN}


class GlooSockets:
    """The gloo endpoints of the groups this process created, and the power to cut them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # label -> (our listeners, the peers' listeners); "layout" is the default group and its mesh.
        self.groups: dict[str, tuple[set[Endpoint], set[Endpoint]]] = {}

    @contextlib.contextmanager
    def track(self, store, label: str, rank: int, world: int, timeout_s: float = 60.0):
        """Record the listeners gloo opens inside the block, then swap them with the peers' via ``store``."""
        from elastic.runtime.parallel.store import wait_keys

        before = listeners()
        yield
        created = listeners() - before
        store.set(f"gloo-listeners/{rank}", json.dumps(sorted(created)))
        keys = [f"gloo-listeners/{peer}" for peer in range(world) if peer != rank]
        wait_keys(store, keys, timeout_s)
        theirs = set()
        for key in keys:
            theirs.update(tuple(e) for e in json.loads(store.get(key)))
        with self._lock:
            mine, peers = self.groups.setdefault(label, (set(), set()))
            mine |= created
            peers |= theirs

    def cut(self, label: str | None = None, exclude: set[str] = frozenset()) -> int:
        """Shut down the established connections of group ``label`` (all groups but ``exclude``: None).
        Returns how many."""
        with self._lock:
            chosen = [v for k, v in self.groups.items() if (label is None and k not in exclude) or k == label]
            mine = set().union(*(m for m, _ in chosen)) if chosen else set()
            peers = set().union(*(p for _, p in chosen)) if chosen else set()
        cut = 0
        for local, remote, state, fd in _socket_table():
            if state != _ESTABLISHED or not (local in mine or remote in peers):
                continue
            with contextlib.suppress(OSError):
                sock = socket.socket(fileno=os.dup(fd))
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                    cut += 1
                finally:
                    sock.close()  # closes our duplicate only; gloo still owns the original fd
        if cut:
            log.info("cut %d gloo connections", cut)
        return cut

    def forget(self, label: str) -> None:
        with self._lock:
            self.groups.pop(label, None)
