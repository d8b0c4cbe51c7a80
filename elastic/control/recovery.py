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
from pathlib import Path

import ray

from elastic.control.states import State
from elastic.core.layout import Placement
from elastic.driver.checkpoints import save_checkpoint
from elastic.driver.ray_group import WorkerFailure, WorkerGroup
from elastic.driver.resharder import ReshardFailed, reshard
from elastic.plan.planner import MissingShards, make_plan

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
            text = str(err).strip()
            reason = text.splitlines()[0] if text else type(err).__name__
            log.warning("snapshot at step %d is incomplete (%s); keeping the previous one", snap.step, reason)
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


class RecoveryMixin:
    """The controller's RECOVERING state, on-disk checkpoints and growing back (a mixin of ``Controller``)."""

    def _recovering(self) -> None:
        """Settle the survivors, then move to the best layout for them: replicas first, else the snapshot."""
        failure, group = self.failure, self.group
        started = time.perf_counter()
        dead = sorted(getattr(failure, "dead", {}) or {})
        if not dead:
            raise RuntimeError(f"a step failed with no worker lost, so retrying would fail again: {failure}")
        self.draining -= set(dead)
        current = group.placement
        survivors = [w for w in current.workers if w in group.actors]
        try:
            if survivors:
                group.call("sync", group.committed, workers=survivors)
            decision = self.policy.decide(current, self._usable(), self.cfg.train.steps - self.step, must_move=True,
                                          reason=f"recover from the loss of workers {dead}", phase=self.phase,
                                          alive=frozenset(group.actors))
            if decision.placement is None:
                if not self._state_survives(current):
                    raise RuntimeError(f"lost workers {dead} held shards that no survivor and no snapshot has; the "
                                       "training state is gone. Resume from an on-disk checkpoint (--resume), and "
                                       "run with --snapshot-every or a layout with dp >= 2 to survive this")
                self.record("pause", text=decision.describe())
                self.state = State.PAUSED
                return
            how, lost = "replicas", 0
            try:
                report = reshard(group, decision.placement, group.committed, decision.reason,
                                 alive=frozenset(group.actors))
                self.reshards.append(report)
            except MissingShards as missing:
                snap = self.snapshots.usable()
                if snap is None:
                    raise RuntimeError(f"{missing}; no replica and no snapshot holds them. Run with snapshot_every > 0 "
                                       "or a layout with dp >= 2 to survive this loss") from None
                restore(group, snap, decision.placement)
                how, lost = f"snapshot of step {snap.step}", self.step - snap.step
                self.step = snap.step
        except (WorkerFailure, ReshardFailed) as again:  # another loss while recovering: start over
            self.failure = getattr(again, "failure", None) or again
            self.record("failure", text=f"during recovery: {again}")
            return
        for w in [w for w in group.alive() if w not in decision.placement.workers and w in (current.workers or ())]:
            group.actors[w].release.remote()
        self._start_replacements()
        seconds = time.perf_counter() - started
        self.recoveries.append({"dead": dead, "seconds": seconds, "how": how, "steps_lost": lost,
                                "layout": str(decision.placement.layout), "step": self.step})
        self.record("recovered", text=f"lost workers {dead}; now {decision.placement.layout} on "
                                      f"workers {list(decision.placement.workers)} from {how} in {seconds:.2f} s"
                                      + (f", replaying {lost} steps" if lost else ""), seconds=seconds, how=how,
                    steps_lost=lost)
        self._fresh = True
        self.state = State.RUNNING

    def _checkpoint(self) -> None:
        try:
            folder, seconds = save_checkpoint(self.group, Path(self.opt.checkpoint_dir))
        except WorkerFailure as failure:  # the previous complete checkpoint stays the latest
            self.record("failure", text=f"during checkpoint: {failure}", dead=sorted(failure.dead))
            self.failure = failure
            self.state = State.RECOVERING
            return
        self.record("checkpoint", text=f"wrote {folder} in {seconds:.2f} s", path=str(folder))

    def redundancy_report(self) -> str:
        """What protects the state, and what it costs: replicas (dp >= 2) and/or snapshots."""
        layouts = self.policy.layouts(self.budget)
        cost = self.cost.step_seconds
        replicated = [l for l in layouts if l.dp >= 2]
        text = ["redundancy:"]
        if layouts and replicated:
            best, best_rep = min(layouts, key=cost), min(replicated, key=cost)
            extra = cost(best_rep) / cost(best) - 1
            text.append(f"with {self.budget} workers the best layout keeping a replica is {best_rep} "
                        f"({extra:+.0%} predicted step time against {best})"
                        + ("; only such layouts are used" if self.opt.require_replica else ""))
        else:
            text.append(f"no layout of {self.budget} workers keeps a replica")
        state_mb = sum(s.numel for s in self.policy.specs) * self.cost.itemsize / 1e6
        if self.opt.snapshot_every:
            text.append(f"in-memory snapshot every {self.opt.snapshot_every} steps: {state_mb:.1f} MB held in Ray's "
                        "object store, a copy stall per snapshot, at most "
                        f"{self.opt.snapshot_every - 1} steps replayed after a loss without a replica")
        else:
            text.append("no snapshots: a loss without a surviving replica ends the job")
        return "; ".join(text)

    def _state_survives(self, placement: Placement) -> bool:
        """Whether the live workers (or the snapshot) still hold every shard of ``placement``."""
        if self.snapshots.usable(wait_s=0) is not None:
            return True
        try:
            make_plan(placement, placement, tuple(self.policy.specs), self.cfg.model.n_layers, 1,
                      frozenset(self.group.actors))
        except MissingShards:
            return False
        return True

    def _start_replacements(self) -> None:
        """Grow back towards the budget in the background (the job keeps training meanwhile)."""
        missing = self.budget - len(self._usable()) - len(self.group.starting)
        if missing > 0:
            started = self.group.start(missing)
            self.record("scale-out", text=f"starting replacement workers {started} in the background")

