"""Recovery without restart: replicas first, then the last in-memory snapshot and a replay.

Snapshots are taken every ``snapshot_every`` committed steps. Each worker copies its shards
(the only stall) and returns the copy to the driver, which then owns it in Ray's object store:
a snapshot outlives the worker it came from. A snapshot becomes usable once every part has
arrived; the previous one is kept until then.

When workers die, the survivors settle at the last committed step and the job reshards onto
the best layout for what is left, taking lost shards from surviving replicas. If some shard has
no live replica, every rank is rebuilt from the snapshot and the steps since then are replayed;
the data cursor and the LR schedule are functions of the step, so the replay is exact.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray

from elastic.controller.group import WorkerGroup
from elastic.layout import Placement

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    step: int
    placement: Placement
    refs: dict[int, ray.ObjectRef]
    nbytes: int
    stall_seconds: float


class Snapshotter:
    def __init__(self, group: WorkerGroup, every: int) -> None:
        self.group, self.every = group, every
        self.latest: Snapshot | None = None
        self.inflight: Snapshot | None = None
        self.taken = 0
        self.stall_total = 0.0

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0 and (self.latest is None or self.latest.step != step)

    def take(self) -> Snapshot:
        """Copy every rank's shards now; the copies travel to the object store in the background."""
        group, placement = self.group, self.group.placement
        self._promote()
        started = time.perf_counter()
        sizes = group.call("snapshot_copy", group.committed, workers=placement.workers)
        stall = time.perf_counter() - started
        refs = {w: group.actors[w].snapshot_take.remote() for w in placement.workers}
        self.inflight = Snapshot(group.committed, placement, refs, sum(sizes.values()), stall)
        self.taken += 1
        self.stall_total += stall
        return self.inflight

    def _promote(self) -> None:
        snap = self.inflight
        if snap is None:
            return
        ready, pending = ray.wait(list(snap.refs.values()), num_returns=len(snap.refs), timeout=0)
        if pending:
            return
        try:
            ray.get(ready)
        except Exception as err:  # a worker died before handing its part over: keep the older snapshot
            log.warning("snapshot at step %d is incomplete (%s); keeping the previous one", snap.step, err)
            self.inflight = None
            return
        self.latest, self.inflight = snap, None

    def usable(self, wait_s: float = 5.0) -> Snapshot | None:
        """The newest complete snapshot (waiting briefly for one still in flight)."""
        if self.inflight is not None:
            ray.wait(list(self.inflight.refs.values()), num_returns=len(self.inflight.refs), timeout=wait_s)
            self._promote()
        return self.latest


def restore(group: WorkerGroup, snap: Snapshot, new: Placement) -> float:
    """Rebuild every rank of ``new`` from ``snap`` (all ranks roll back to the snapshot's step)."""
    started = time.perf_counter()
    name = group.next_group_name()
    sources = {w: [ref] for w, ref in snap.refs.items()}
    group.call_each("restore", {w: (new, name, snap.placement, sources, snap.step) for w in new.workers},
                    forming=name)
    group.placement, group.committed = new, snap.step
    return time.perf_counter() - started
