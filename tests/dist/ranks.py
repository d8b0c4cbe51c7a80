"""Run a function as ``world`` gloo ranks in fresh processes (spawned: nothing inherited from pytest's torch).

Each process runs ``target(rank, world, port, queue)``, with ``port`` free on 127.0.0.1 for its rendezvous, and
puts one message on ``queue``; ``run_ranks`` returns the messages in arrival order and leaves no process behind.
"""

from __future__ import annotations

import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target, world: int, timeout: float) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        return [queue.get(timeout=timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
