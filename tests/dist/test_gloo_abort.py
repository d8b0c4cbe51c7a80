"""Gloo without Ray: cutting a rank's gloo sockets releases peers blocked on it at once.

Without the cut, a rank blocked on a live-but-stuck peer waits out the collective timeout
(the failure this module exists to prevent); the test shows that the peers are released by the cut
(their error is the closed connection, not the 60 s timeout). How long that takes is a benchmark's
question: ``bench/abort_release.py`` prints it.
"""

from __future__ import annotations

import datetime
import time

import pytest

from tests.dist.ranks import run_ranks


def _rank_main(rank: int, world: int, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    from elastic.core.layout import Layout
    from elastic.runtime.parallel import connections

    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=30))
    from elastic.runtime.parallel.groups import LayoutGroups

    groups = LayoutGroups(store, "g", rank, Layout(dp=world), 60, connections.SOCKETS)
    groups.activate()
    group = groups.mesh["dp"].get_group()
    dist.barrier(group=group)
    started = time.monotonic()
    try:
        if rank == 0:
            time.sleep(0.5)  # rank 0 is alive but never joins: ranks 1.. block on it
            cut = connections.abort_groups()
            queue.put((rank, "cut", cut, time.monotonic() - started))
            time.sleep(3)
        else:
            dist.all_reduce(torch.ones(10), group=group)
            queue.put((rank, "completed", 0, time.monotonic() - started))
    except Exception as err:  # the expected path for ranks 1..
        queue.put((rank, "released", str(err)[:300], time.monotonic() - started))


@pytest.mark.timeout(60)
def test_cutting_sockets_releases_blocked_peers():
    world = 3
    events = {rank: (what, detail, seconds) for rank, what, detail, seconds in run_ranks(_rank_main, world, 45)}
    assert events[0][0] == "cut" and events[0][1] >= 2  # it held a connection to each peer
    for rank in range(1, world):
        what, detail, _ = events[rank]
        assert what == "released", events
        # Released by the cut (gloo: the peer closed the connection), not by the 60 s collective timeout
        # ("Timed out"). How soon: bench/abort_release.py prints it.
        assert "Connection closed by peer" in detail and "Timed out" not in detail, detail
