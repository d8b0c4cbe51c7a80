"""How soon cutting a rank's gloo sockets releases peers blocked on it in a collective, against waiting out
the collective timeout (the same run, the same processes' setup).

``world`` plain processes (no Ray) form the layout's gloo groups as workers do (``LayoutGroups`` over
``connections.SOCKETS``); ranks 1.. enter an all-reduce that rank 0 never joins. With the cut, rank 0 calls
``connections.abort_groups()`` after ``--hold`` seconds; without it (the baseline), it does nothing and the
peers wait for the collective timeout (``--timeout``). Printed per peer: seconds from the cut (or from the
hold's end) to its release, and the error that released it. ``tests/dist/test_gloo_abort.py`` checks that
the cut releases the peers (their error is the closed connection); the times are here.

Usage: python bench/abort_release.py [--world 3] [--hold 0.5] [--timeout 5]   (about 20 s)
Never fails on timing.
"""

from __future__ import annotations

import argparse
import datetime
import socket
import time

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, cut: bool, hold: float, timeout: float, queue) -> None:
    import torch
    import torch.distributed as dist

    from elastic.core.layout import Layout
    from elastic.runtime.parallel import connections
    from elastic.runtime.parallel.groups import LayoutGroups

    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=30))
    groups = LayoutGroups(store, "g", rank, Layout(dp=world), timeout, connections.SOCKETS)
    groups.activate()
    group = groups.mesh["dp"].get_group()
    dist.barrier(group=group)
    started = time.monotonic()
    try:
        if rank == 0:
            time.sleep(hold)  # alive, never joining: the peers block on it
            if cut:
                connections.abort_groups()
            queue.put((rank, "cut" if cut else "held", "", time.monotonic() - started))
            time.sleep(timeout + 2)
        else:
            dist.all_reduce(torch.ones(10), group=group)
            queue.put((rank, "completed", "", time.monotonic() - started))
    except Exception as err:  # the expected path for ranks 1..
        queue.put((rank, "released", " ".join(str(err).split("] ", 1)[-1].split())[:70], time.monotonic() - started))


def run(world: int, cut: bool, hold: float, timeout: float) -> dict[int, tuple[str, str, float]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, cut, hold, timeout, queue)) for r in range(world)]
    for p in procs:
        p.start()
    events = {}
    for _ in range(world):
        rank, what, detail, seconds = queue.get(timeout=timeout + 60)
        events[rank] = (what, detail, seconds)
    for p in procs:
        p.join(timeout=timeout + 10)
        if p.is_alive():
            p.kill()
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=3)
    parser.add_argument("--hold", type=float, default=0.5, help="seconds rank 0 holds the peers before the cut")
    parser.add_argument("--timeout", type=float, default=5.0, help="the groups' collective timeout, seconds")
    args = parser.parse_args()
    print(f"{args.world} ranks; rank 0 never joins the all-reduce; collective timeout {args.timeout:.0f} s")
    print(f"{'how':22} {'rank':>4} {'released after (s)':>18}  error")
    for cut in (True, False):
        events = run(args.world, cut, args.hold, args.timeout)
        for rank in range(1, args.world):
            what, detail, seconds = events[rank]
            how = "cut after the hold" if cut else "no cut (the baseline)"
            print(f"{how:22} {rank:4} {seconds - args.hold:18.3f}  {what}: {detail}")


if __name__ == "__main__":
    main()
