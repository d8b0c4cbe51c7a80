"""The rounds a live reshard runs: each worker sends plus receives at most a byte budget per round.

Why rounds: a worker receives into fresh buffers and may send from contiguous copies, so the bytes
in flight at once are the reshard's extra memory. Bounding them per round bounds that memory by
``runtime.reshard_round_bytes`` whatever the model size. (``stream_rounds.py`` schedules for another
purpose: the cluster-scale model, where the limit is concurrent streams per link.)

``transfer_work`` turns a plan into what each worker is told: the (round, tag, transfer) entries it
sends, receives or copies, and the workers that meet in the transfer group (those with remote
pieces). Pure Python, no torch, no processes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from elastic.plan.planner import Plan, Transfer

WorkItem = tuple[int, int, Transfer]  # (round, message tag, transfer); round -1 for a local copy
DISK = -2  # the round of a piece its destination reads from the base folder instead of receiving it


@dataclass(frozen=True)
class TransferWork:
    """Each worker's share of a plan's transfers, and the workers that exchange remote pieces."""

    per_worker: dict[int, list[WorkItem]]
    movers: tuple[int, ...]

    def of(self, worker: int) -> list[WorkItem]:
        return self.per_worker.get(worker, [])


def memory_bounded_rounds(transfers: list[Transfer], max_bytes_per_worker: int,
                          skip: frozenset[str] = frozenset()) -> list[list[int]]:
    """Group remote transfers (by index) into rounds where each worker sends plus receives at most
    ``max_bytes_per_worker`` (a single larger message gets a round of its own). Local copies, and pieces of
    the tensors in ``skip``, are left out.
    """
    rounds: list[list[int]] = []
    used: list[dict[int, int]] = []
    for index, t in enumerate(transfers):
        if t.local or t.tensor in skip:
            continue
        r = next((r for r, load in enumerate(used)
                  if load.get(t.src, 0) + t.nbytes <= max_bytes_per_worker
                  and load.get(t.dst, 0) + t.nbytes <= max_bytes_per_worker), None)
        if r is None:
            rounds.append([])
            used.append({})
            r = len(rounds) - 1
        rounds[r].append(index)
        used[r][t.src] = used[r].get(t.src, 0) + t.nbytes
        used[r][t.dst] = used[r].get(t.dst, 0) + t.nbytes
    return rounds


def transfer_work(plan: Plan, round_bytes: int, from_disk: frozenset[str] = frozenset()) -> TransferWork:
    """What every worker of ``plan`` does: its transfers with their round and message tag (the index in
    ``plan.transfers``), plus the sorted ids of the workers that send or receive remote pieces.

    Remote pieces of the tensors in ``from_disk`` (a LoRA run's frozen base, which the base folder holds
    unchanged) go to their destination alone, in round ``DISK``: it reads them from the folder."""
    round_of = {index: r for r, indices in enumerate(memory_bounded_rounds(plan.transfers, round_bytes, from_disk))
                for index in indices}
    work: dict[int, list[WorkItem]] = defaultdict(list)
    remote = []
    for index, t in enumerate(plan.transfers):
        if not t.local and t.tensor in from_disk:
            work[t.dst].append((DISK, index, t))
            continue
        work[t.dst].append((round_of.get(index, -1), index, t))
        if t.src != t.dst:
            work[t.src].append((round_of.get(index, -1), index, t))
            remote.append(t)
    movers = tuple(sorted({t.src for t in remote} | {t.dst for t in remote}))
    return TransferWork(dict(work), movers)
