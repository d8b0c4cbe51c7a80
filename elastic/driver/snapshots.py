"""In-memory snapshots for recovery without a replica: taken every ``snapshot_every`` committed steps.

Each worker copies its shards (the only stall) and hands the copy to the driver, which then owns it
(in Ray's object store for ``RayWorkerGroup``): a snapshot outlives the worker it came from. A
snapshot becomes usable once every part has arrived; the previous one is kept until then, and a
snapshot that lost a part (its worker died before handing it over) is dropped for the previous one.
"""

from __future__ import annotations

from elastic.driver.group import Snapshot, WorkerGroup


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
        """Copy every rank's shards now; the copies travel to the driver in the background."""
        self._promote()
        snap = self.group.snapshot()
        self.inflight = snap
        self.taken += 1
        self.stall_total += snap.stall_seconds
        return snap

    def _promote(self, wait_s: float = 0.0) -> None:
        snap = self.inflight
        if snap is None:
            return
        status = self.group.snapshot_status(snap, wait_s)
        if status is False:
            return
        if status:
            self.latest = snap
        self.inflight = None

    def usable(self, wait_s: float = 5.0) -> Snapshot | None:
        """The newest complete snapshot (waiting briefly for one still in flight)."""
        self._promote(wait_s)
        return self.latest
