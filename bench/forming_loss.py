"""How long a member that dies while its gloo group forms holds the others: our groups against one gloo group
made the way it was before (one timeout for connecting and for collectives), in the same run.

``--world`` plain processes (no Ray) form one group through ``AbortableStore`` over a TCPStore, as a reshard's
transfer group forms (``connections.standalone_group``). The last rank publishes its gloo address, then exits
before connecting (a store wrapper that ends the process after its first ``set``): the window in which the
driver's abort key cannot help, because gloo's connect does not read the store. Printed per surviving rank:
seconds until group creation raised, and the error. Ours connects within ``connections.CONNECT_TIMEOUT_S`` and
then takes the collective timeout; the baseline is constructed with the collective timeout (``--timeout``).
Gloo retries a refused connect, so the baseline waits about five times ``--timeout`` (the transfer group's
default collective timeout is 3,600 s; 20 s keeps this run short).

Usage: python bench/forming_loss.py [--world 3] [--timeout 20]   (about 3 minutes at the defaults)
Never fails on timing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import time

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DiesAfterPublishing(dist.Store):
    """Delegates to ``inner``; the process ends right after its first ``set`` (its gloo address)."""

    def __init__(self, inner: dist.Store) -> None:
        super().__init__()
        self.inner = inner

    def set(self, key, value):
        self.inner.set(key, value)
        os._exit(0)

    def get(self, key):
        return self.inner.get(key)

    def wait(self, keys, timeout=None):
        return self.inner.wait(keys) if timeout is None else self.inner.wait(keys, timeout)

    def check(self, keys):
        return self.inner.check(keys)

    def add(self, key, value):
        return self.inner.add(key, value)


def _rank(rank: int, world: int, port: int, ours: bool, timeout: float, queue) -> None:
    from elastic.runtime.parallel import connections
    from elastic.runtime.parallel.store import AbortableStore

    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=600))
    started = time.monotonic()
    try:
        if rank == world - 1:
            store = DiesAfterPublishing(dist.PrefixStore("t", store))
            dist.ProcessGroupGloo(store, rank, world, datetime.timedelta(seconds=timeout))
        elif ours:
            connections.standalone_group(store, "t", rank, world, timeout)
        else:
            prefixed = AbortableStore(dist.PrefixStore("t", store), timeout)
            dist.ProcessGroupGloo(prefixed, rank, world, datetime.timedelta(seconds=timeout))
        queue.put((rank, "formed", time.monotonic() - started))
    except Exception as err:  # noqa: BLE001 (the error is what is measured)
        queue.put((rank, str(err).splitlines()[0][:110], time.monotonic() - started))
    time.sleep(2)  # rank 0 hosts the store: the others read it until they are done


def run(world: int, ours: bool, timeout: float) -> list[tuple[int, str, float]]:
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, ours, timeout, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=10 * timeout + 120) for _ in range(world - 1))
    for p in procs:
        p.join(30)
    return results


def main() -> None:
    from elastic.runtime.parallel.connections import CONNECT_TIMEOUT_S

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=20.0, help="the group's collective timeout, seconds")
    args = parser.parse_args()
    print(f"forming_loss: {args.world} processes, rank {args.world - 1} dies after publishing its address; "
          f"collective timeout {args.timeout:g} s, our connect timeout {CONNECT_TIMEOUT_S:g} s")
    worst = {}
    for ours, name in ((True, "ours (connect timeout, then collective)"), (False, "baseline (one timeout)")):
        results = run(args.world, ours, args.timeout)
        worst[ours] = max(s for _, _, s in results)
        for rank, what, seconds in results:
            print(f"  {name:40} rank {rank}: {seconds:7.1f} s  {what}")
    print(f"longest hold: ours {worst[True]:.1f} s, baseline {worst[False]:.1f} s: "
          f"{worst[False] / worst[True]:.1f}x shorter than the baseline at this collective timeout (the baseline "
          "grows with it; ours does not)")


if __name__ == "__main__":
    main()
