"""Run a function as ``world`` gloo ranks in fresh processes (spawned: nothing inherited from pytest's torch).

Each process runs ``target(rank, world, port, queue, *args)``, with ``port`` free on 127.0.0.1 for its rendezvous,
and puts one message on ``queue``; ``run_ranks`` returns the messages in arrival order and leaves no process behind.
``run_mesh_checks`` runs a check on four ranks over the two meshes the vocabulary-parallel tests use and returns
every rank's errors.
"""

from __future__ import annotations

import datetime
import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target, world: int, timeout: float, *args) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, queue, *args)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        return [queue.get(timeout=timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def run_mesh_checks(checks, timeout: float) -> list[str]:
    """Every error of ``checks(hsdp, flat, rank, world) -> list[str]`` (a module-level function: spawned processes
    import it) on four gloo ranks, ``hsdp`` a dp=2 x fsdp=2 mesh and ``flat`` an fsdp=4 one; an exception is an error
    too, reported with its rank."""
    world = 4
    results = dict(run_ranks(_mesh_main, world, timeout, checks))
    missing = sorted(set(range(world)) - set(results))
    return [f"rank {r} sent nothing" for r in missing] + [e for r in sorted(results) for e in results[r]]


def _mesh_main(rank: int, world: int, port: int, queue, checks) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    errors = []
    try:
        hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "fsdp"))
        flat = init_device_mesh("cpu", (4,), mesh_dim_names=("fsdp",))
        errors += checks(hsdp, flat, rank, world)
    except Exception as err:  # reported, not swallowed: the test fails with it
        errors.append(f"rank {rank}: {type(err).__name__}: {err}")
    finally:
        queue.put((rank, errors))
        dist.destroy_process_group()
