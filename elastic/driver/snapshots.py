"""In-memory snapshots for recovery without a replica: taken every ``snapshot_every`` committed steps.

Each worker copies its shards (the only stall) and hands the copy to the driver, which then owns it
(in Ray's object store for ``RayWorkerGroup``): a snapshot outlives the worker it came from. A
snapshot becomes usable once every part has arrived and is held off its worker's node (a copy in the
driver node's object store: the group's ``snapshot_status``, looked at after every step so the copies
travel while training goes on); the previous one is kept until then, and a
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
        self.last_stall: float | None = None  # the newest snapshot's copy stall, seconds

    def due(self, step: int) -> bool:
        """Whether ``every`` steps have passed since the newest snapshot taken (none yet: since step 0)."""
        newest = self.inflight or self.latest
        return self.every > 0 and step - (newest.step if newest else 0) >= self.every

    def take(self) -> Snapshot | None:
        """Copy every rank's shards now; the copies travel to the driver in the background. None (nothing taken)
        while the previous snapshot is still on its way: it is promoted first, and at most one travels."""
        self._promote()
        if self.inflight is not None:
            return None
        snap = self.group.snapshot()
        self.inflight = snap
        self.taken += 1
        self.stall_total += snap.stall_seconds
        self.last_stall = snap.stall_seconds
        return snap

    def poll(self) -> None:
        """Look at the snapshot in flight (non-blocking): called after every step, this also keeps its parts
        travelling to the driver's node (``snapshot_status``), which a snapshot needs before it counts."""
        self._promote()

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

    def discard(self, snap: Snapshot) -> None:
        """Forget ``snap`` (a part of it turned out to be lost); the next recovery uses an older source."""
        if self.latest is snap:
            self.latest = None

    def usable(self, wait_s: float = 5.0) -> Snapshot | None:
        """The newest complete snapshot (waiting briefly for one still in flight)."""
        self._promote(wait_s)
        return self.latest
