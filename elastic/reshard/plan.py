"""The reshard planner: a pure function from (old placement, new placement, tensor specs) to transfers.

Every state tensor has one global coordinate space. In the old placement the *distinct* boxes of
a tensor tile it exactly once (replicas hold equal boxes), so every new box is covered exactly
once by intersecting it with those distinct boxes. Each piece gets a source:

1. the destination worker itself, when it held that piece before (a local copy, no traffic);
2. otherwise the least-loaded live replica that holds it (bytes already assigned, then worker id).

Pieces larger than ``chunk_bytes`` are split along their first splittable dimension, so that a
single message never needs more than that much buffer. ``schedule_rounds`` then groups messages
into rounds that bound the bytes any worker sends plus receives at once.

No processes, no torch: the plan is tested by property tests and cached per (old, new) pair.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass, field

from elastic.layout import Box, Placement, TensorSpec, box_numel, intersect


@dataclass(frozen=True)
class Transfer:
    """Copy ``box`` (global coordinates) of ``tensor`` from worker ``src`` to worker ``dst``."""

    tensor: str
    src: int
    dst: int
    box: Box
    nbytes: int

    @property
    def local(self) -> bool:
        return self.src == self.dst


class MissingShards(RuntimeError):
    """Some part of the state has no live holder; it must come from a snapshot."""

    def __init__(self, missing: dict[str, list[Box]]) -> None:
        self.missing = missing
        names = ", ".join(sorted(missing)[:5]) + (" ..." if len(missing) > 5 else "")
        super().__init__(f"{len(missing)} tensors have parts held by no live worker: {names}")


@dataclass
class Plan:
    old: Placement | None
    new: Placement
    transfers: list[Transfer] = field(default_factory=list)

    @property
    def remote(self) -> list[Transfer]:
        return [t for t in self.transfers if not t.local]

    def bytes_moved(self) -> int:
        return sum(t.nbytes for t in self.transfers if not t.local)

    def bytes_by_worker(self) -> dict[int, tuple[int, int]]:
        """worker -> (bytes sent, bytes received) over the network."""
        out: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        for t in self.remote:
            out[t.src][0] += t.nbytes
            out[t.dst][1] += t.nbytes
        return {w: (s, r) for w, (s, r) in out.items()}

    def for_worker(self, worker: int) -> list[tuple[int, Transfer]]:
        """(message tag, transfer) for every transfer this worker sends, receives or copies."""
        return [(i, t) for i, t in enumerate(self.transfers) if worker in (t.src, t.dst)]


def _split(box: Box, nbytes: int, chunk_bytes: int) -> list[Box]:
    """Split ``box`` along its first dimension with extent > 1 into pieces of at most chunk_bytes."""
    if nbytes <= chunk_bytes:
        return [box]
    for dim, (lo, hi) in enumerate(box):
        if hi - lo > 1:
            per_row = nbytes // (hi - lo)
            rows = max(1, chunk_bytes // max(per_row, 1))
            return [box[:dim] + ((s, min(s + rows, hi)),) + box[dim + 1 :] for s in range(lo, hi, rows)]
    return [box]


def make_plan(old: Placement | None, new: Placement, specs: tuple[TensorSpec, ...], n_layers: int,
              itemsize: int, alive: frozenset[int] | None = None, chunk_bytes: int = 64 << 20) -> Plan:
    """Transfers that build every new rank's boxes from the old placement's live workers.

    ``alive`` restricts sources (None: every old worker is alive). Raises MissingShards if some
    part of a tensor has no live holder. With ``old=None`` the plan is empty (fresh start).
    """
    plan = Plan(old, new)
    if old is None:
        return plan
    load: dict[int, int] = defaultdict(int)
    missing: dict[str, list[Box]] = {}
    for spec in specs:
        replicas: dict[Box, list[int]] = defaultdict(list)
        for worker, box in old.holders(spec, n_layers):
            if alive is None or worker in alive:
                replicas[box].append(worker)
        held_by_dead = [box for worker, box in old.holders(spec, n_layers) if box not in replicas]
        for dst, new_box in new.holders(spec, n_layers):
            covered = 0
            for old_box, holders in replicas.items():
                piece = intersect(new_box, old_box)
                if piece is None:
                    continue
                covered += box_numel(piece)
                nbytes = box_numel(piece) * itemsize
                if dst in holders:
                    src = dst
                else:
                    src = min(holders, key=lambda w: (load[w], w))
                    load[src] += nbytes
                for part in _split(piece, nbytes, chunk_bytes) if src != dst else [piece]:
                    plan.transfers.append(Transfer(spec.name, src, dst, part, box_numel(part) * itemsize))
            if covered != box_numel(new_box):
                missing.setdefault(spec.name, []).extend(
                    b for b in held_by_dead if intersect(b, new_box) is not None)
    if missing:
        raise MissingShards(missing)
    return plan


@functools.lru_cache(maxsize=64)
def cached_plan(old: Placement | None, new: Placement, specs: tuple[TensorSpec, ...], n_layers: int,
                itemsize: int, alive: frozenset[int] | None = None, chunk_bytes: int = 64 << 20) -> Plan:
    """``make_plan`` cached per (old, new, specs, alive): repeated transitions plan once."""
    return make_plan(old, new, specs, n_layers, itemsize, alive, chunk_bytes)


def schedule_rounds(transfers: list[Transfer], max_bytes_per_worker: int) -> list[list[int]]:
    """Group remote transfers (by index) into rounds where each worker sends plus receives at most
    ``max_bytes_per_worker`` (a single larger message gets a round of its own). Local copies are left out.
    """
    rounds: list[list[int]] = []
    used: list[dict[int, int]] = []
    for index, t in enumerate(transfers):
        if t.local:
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
