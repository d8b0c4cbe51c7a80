"""Gloo takes one timeout for connecting a group and for its collectives. Our groups connect within
``CONNECT_TIMEOUT_S`` and then carry the collective timeout; the rendezvous before the connect (peers arriving)
waits as long as the store's own timeout, whatever shorter timeout gloo passes it. In one process (world 1).
What the short connect timeout buys (a member dead after publishing its address holds the others about 50 s,
not five times the collective timeout): docs/design.md, item 4."""

from __future__ import annotations

import datetime
import threading

import pytest
import torch
import torch.distributed as dist

from elastic.core.layout import Layout
from elastic.runtime.parallel import connections
from elastic.runtime.parallel.groups import LayoutGroups
from elastic.runtime.parallel.store import AbortableStore, GroupAborted


def test_groups_carry_the_collective_timeout_after_connecting():
    pg = connections.standalone_group(dist.HashStore(), "transfer", 0, 1, 321.0)
    assert pg.options._timeout == datetime.timedelta(seconds=321)
    assert connections.CONNECT_TIMEOUT_S < 321
    groups = LayoutGroups(dist.HashStore(), "layout", 0, Layout(), 30.0, connections.SOCKETS, 654.0)
    try:
        for group in [groups.world, *groups.dims]:
            assert group._get_backend(torch.device("cpu")).options._timeout == datetime.timedelta(seconds=654)
    finally:
        groups.close()
        connections.close_standalone("transfer")


def test_the_rendezvous_waits_the_stores_timeout_not_glooss_connect_timeout():
    store = AbortableStore(dist.HashStore(), timeout_s=30.0)
    arrives = threading.Timer(0.2, lambda: store.set("peer", b"address"))
    arrives.start()
    store.wait(["peer"], datetime.timedelta(milliseconds=10))  # gloo's short timeout: the peer comes later
    assert store.get("peer") == b"address"
    quick = AbortableStore(dist.HashStore(), timeout_s=0.05)
    with pytest.raises(TimeoutError):  # the store's own timeout still ends a wait nobody answers
        quick.wait(["never"], datetime.timedelta(milliseconds=1))
    store.set("abort", b"1")
    with pytest.raises(GroupAborted):  # and the driver's abort key at once
        store.wait(["never"], datetime.timedelta(hours=1))
