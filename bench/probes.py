"""Probes the benchmarks (and a few tests) run on workers: memory, held skeletons, link and copy rates.

Each probe is a typed task (``elastic/runtime/tasks.py``) that runs inside the worker through the group's
``run``; none is part of the worker actor or of the ``WorkerGroup`` protocol. The functions take a
``RayWorkerGroup``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from elastic.runtime.parallel import connections


@dataclass(frozen=True)
class Memory:
    """Resident and peak resident bytes of the worker's process (Linux); ``reset_peak`` restarts the peak."""

    reset_peak: bool = False
    needs_engine: ClassVar[bool] = False

    def run(self, ctx) -> dict[str, int]:
        if self.reset_peak:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        fields = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(value.split()[0]) * 1024
        return {"rss": fields["VmRSS"], "peak": fields["VmHWM"]}


@dataclass(frozen=True)
class HeldSkeletons:
    """The placements the worker holds engine skeletons of."""

    needs_engine: ClassVar[bool] = False

    def run(self, ctx) -> list:
        return ctx.skeletons.placements()


@dataclass(frozen=True)
class DropSkeletons:
    """Drop every skeleton (the rebuild-on-the-stall baseline); returns how many there were."""

    needs_engine: ClassVar[bool] = False

    def run(self, ctx) -> int:
        n = len(ctx.skeletons.placements())
        ctx.skeletons.clear()
        return n


@dataclass(frozen=True)
class MemcpySeconds:
    """Seconds to copy ``nbytes`` between two fresh buffers in the worker's process (best of ``repeats``)."""

    nbytes: int
    repeats: int = 3
    needs_engine: ClassVar[bool] = False

    def run(self, ctx) -> float:
        src, dst = torch.ones(self.nbytes // 4), torch.empty(self.nbytes // 4)
        best = float("inf")
        for _ in range(self.repeats):
            started = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - started)
        return best


@dataclass(frozen=True)
class ProbeFlows:
    """Seconds for this worker's part of a probe in which every (sender, receiver) pair sends ``nbytes`` at
    once over a fresh gloo group ``group`` of ``members`` (best of ``repeats``)."""

    group: str
    store: tuple[str, int]
    members: tuple[int, ...]
    sends: tuple[int, ...]
    receives: tuple[int, ...]
    nbytes: int
    timeout_s: float
    repeats: int = 2
    needs_engine: ClassVar[bool] = False

    def run(self, ctx) -> float:
        members = self.members
        pg = connections.standalone_group(connections.store_client(*self.store, self.timeout_s), self.group,
                                          members.index(ctx.worker), len(members), self.timeout_s)
        out = [torch.ones(self.nbytes // 4) for _ in self.sends]
        into = [torch.empty(self.nbytes // 4) for _ in self.receives]
        best = float("inf")
        try:
            for r in range(self.repeats):
                started = time.perf_counter()
                work = [pg.send([buf], members.index(dst), r) for buf, dst in zip(out, self.sends, strict=True)]
                work += [pg.recv([buf], members.index(src), r) for buf, src in zip(into, self.receives, strict=True)]
                for w in work:
                    w.wait()
                best = min(best, time.perf_counter() - started)
        finally:
            del pg
            connections.close_standalone(self.group)
        return best


def memory(group, workers: Iterable[int], reset_peak: bool = False) -> dict[int, dict[str, int]]:
    return group.run({w: Memory(reset_peak) for w in workers})


def skeletons(group, workers: Iterable[int]) -> dict[int, list]:
    return group.run({w: HeldSkeletons() for w in workers})


def drop_skeletons(group, workers: Iterable[int]) -> None:
    group.builds.settle()
    group.run({w: DropSkeletons() for w in workers})


def memcpy_rate(group, workers: Iterable[int], nbytes: int) -> float:
    """Bytes/s of a local copy when ``workers`` all copy ``nbytes`` at once (the slowest one's rate)."""
    seconds = group.run({w: MemcpySeconds(nbytes) for w in workers})
    return nbytes / max(seconds.values())


def probe_flows(group, pairs: Iterable[tuple[int, int]], nbytes: int) -> float:
    """Bytes/s per worker link when every (sender, receiver) pair sends ``nbytes`` at the same time: the
    busiest worker's bytes in or out over the probe's duration (gloo over loopback here)."""
    pairs = sorted(set(pairs))
    members = tuple(sorted({w for pair in pairs for w in pair}))
    group.builds.settle()
    name, store = group.next_group_name(), (group.members.store_addr[0], group.store.port)
    tasks = {w: ProbeFlows(name, store, members, tuple(d for s, d in pairs if s == w),
                           tuple(s for s, d in pairs if d == w), nbytes, group.cfg.runtime.collective_timeout_s)
             for w in members}
    calls = {w: group.members.actors[w].run_task.remote(group.committed, task) for w, task in tasks.items()}
    seconds = max(group.calls.gather(calls, members=members, forming=name).values())
    busiest = max(max(sum(s == w for s, _ in pairs), sum(d == w for _, d in pairs)) for w in members)
    return busiest * nbytes / seconds
