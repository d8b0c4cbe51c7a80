"""``abort._socket_table`` asks each of the process's descriptors for its TCP endpoints and state; the kernel's
``/proc/self/net/tcp{,6}`` tables (parsed here, by inode, as the module once did) must say the same."""

from __future__ import annotations

import ipaddress
import os
import socket

from elastic.runtime.parallel.abort import _socket_table, listeners


def _proc_endpoint(text: str) -> tuple[str, int]:
    addr, port = text.split(":")
    raw = bytes.fromhex(addr)
    if len(raw) == 4:
        ip = ipaddress.IPv4Address(raw[::-1])
    else:  # four little-endian 32-bit words
        ip6 = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
        ip = ip6.ipv4_mapped or ip6
    return (str(ip), int(port, 16))


def _proc_table() -> set:
    inode_fd = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inode_fd[int(target[8:-1])] = int(fd)
    rows = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as fh:
            for line in fh.read().splitlines()[1:]:
                parts = line.split()
                fd = inode_fd.get(int(parts[9]))
                if fd is not None:
                    state = int(parts[3], 16)
                    rows.add((_proc_endpoint(parts[1]), _proc_endpoint(parts[2]) if state == 1 else None, state, fd))
    return rows


def test_socket_table_equals_the_kernels_tables():
    opened = []
    try:
        server = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        server6 = socket.socket(socket.AF_INET6)  # dual-stack: an IPv4 peer appears IPv4-mapped
        server6.bind(("::", 0))
        server6.listen()
        client6 = socket.create_connection(("127.0.0.1", server6.getsockname()[1]))
        accepted6, _ = server6.accept()
        opened = [server, client, accepted, server6, client6, accepted6, *socket.socketpair()]
        rows = set(_socket_table())
        assert rows == _proc_table()
        assert {(r[0], r[2]) for r in rows} >= {(("127.0.0.1", server.getsockname()[1]), 10),
                                                (("127.0.0.1", client.getsockname()[1]), 1),
                                                (("127.0.0.1", accepted6.getsockname()[1]), 1)}
        assert ("127.0.0.1", server.getsockname()[1]) in listeners()
        assert ("::", server6.getsockname()[1]) in listeners()
    finally:
        for sock in opened:
            sock.close()
