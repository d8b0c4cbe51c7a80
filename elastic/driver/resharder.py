"""Drive a live reshard across the worker group: plan, transfer, commit.

1. Plan (pure, cached) on the driver; each worker receives only its own transfers.
2. Transfer: the workers with remote pieces meet in a standalone gloo group and move them
   point to point; everybody else only copies locally. The old engines are not touched, so if
   anything fails here (a destination dies, say) the old placement is still whole.
3. Commit: each worker of the new placement leaves the old group, joins the new one and builds
   its engine from the transferred tensors; drained workers drop their state.

Surviving processes keep their PIDs throughout, and nothing is written to disk.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from elastic.core.layout import Placement
from elastic.driver.ray_group import WorkerFailure, WorkerGroup
from elastic.model.specs import state_specs
from elastic.plan.planner import Plan, cached_plan, schedule_rounds
from elastic.runtime.engine import DTYPE

log = logging.getLogger(__name__)


class ReshardFailed(RuntimeError):
    """A reshard did not complete. ``old_intact`` says whether the old placement can continue."""

    def __init__(self, message: str, old_intact: bool, failure: WorkerFailure | None = None) -> None:
        super().__init__(message)
        self.old_intact, self.failure = old_intact, failure


@dataclass
class ReshardReport:
    old: str
    new: str
    reason: str
    step: int
    plan_seconds: float
    transfer_seconds: float
    commit_seconds: float
    total_seconds: float
    bytes_moved: int
    bytes_copied: int
    max_worker_bytes: int
    peak_buffer_bytes: int
    workers: dict = field(default_factory=dict)

    def line(self) -> str:
        return (f"reshard {self.old} -> {self.new} ({self.reason}) at step {self.step}: "
                f"{self.total_seconds * 1000:.0f} ms, {self.bytes_moved / 1e6:.1f} MB moved, "
                f"{self.bytes_copied / 1e6:.1f} MB kept local")


def plan_for(group: WorkerGroup, old: Placement | None, new: Placement,
             alive: frozenset[int] | None = None) -> Plan:
    cfg = group.cfg
    itemsize = torch.empty((), dtype=DTYPE[cfg.train.dtype]).element_size()
    return cached_plan(old, new, tuple(state_specs(cfg)), cfg.model.n_layers, itemsize, alive,
                       cfg.runtime.reshard_chunk_bytes)


def reshard(group: WorkerGroup, new: Placement, step: int, reason: str,
            alive: frozenset[int] | None = None) -> ReshardReport:
    """Move the job from ``group.placement`` to ``new`` at optimizer step ``step``."""
    started = time.perf_counter()
    old = group.placement
    plan = plan_for(group, old, new, alive)
    rounds = schedule_rounds(plan.transfers, group.cfg.runtime.reshard_round_bytes)
    round_of = {index: r for r, indices in enumerate(rounds) for index in indices}
    work: dict[int, list] = defaultdict(list)
    for index, t in enumerate(plan.transfers):
        entry = (round_of.get(index, -1), index, t)
        work[t.dst].append(entry)
        if t.src != t.dst:
            work[t.src].append(entry)
    movers = tuple(sorted({t.src for t in plan.remote} | {t.dst for t in plan.remote}))
    participants = sorted(set(new.workers) | set(movers))
    planned = time.perf_counter()

    transfer_group = group.next_group_name()
    try:
        stats = group.call_each("reshard_transfer", {
            w: (old, new, work[w], movers if w in movers else (), transfer_group, step) for w in participants},
            cut_group=transfer_group, forming=transfer_group)
    except WorkerFailure as failure:
        survivors = [w for w in participants if w in group.actors]
        for w in survivors:
            group.actors[w].reshard_cancel.remote()
        old_alive = old is not None and all(w in group.actors for w in old.workers)
        raise ReshardFailed(f"reshard {old} -> {new} failed during transfer: {failure}", old_alive, failure) from None
    transferred = time.perf_counter()

    # From here on the new placement's shards exist on its workers (staged): if a commit fails, the
    # job recovers from the new placement, not the old one.
    group.placement = new
    commit_group = group.next_group_name()
    commits = group.call_each("reshard_commit", {w: (commit_group,) for w in new.workers}, forming=commit_group)
    for w, phases in commits.items():
        stats.setdefault(w, {})["commit"] = phases
    drained = [w for w in (old.workers if old else ()) if w not in new.workers and w in group.actors]
    if drained:
        group.call("release", workers=drained)
    done = time.perf_counter()

    by_worker = plan.bytes_by_worker()
    report = ReshardReport(
        old=str(old.layout) if old else "-", new=str(new.layout), reason=reason, step=step,
        plan_seconds=planned - started, transfer_seconds=transferred - planned, commit_seconds=done - transferred,
        total_seconds=done - started, bytes_moved=plan.bytes_moved(),
        bytes_copied=sum(t.nbytes for t in plan.transfers if t.local),
        max_worker_bytes=max((s + r for s, r in by_worker.values()), default=0),
        peak_buffer_bytes=max((s["peak_buffer_bytes"] for s in stats.values()), default=0),
        workers=stats)
    log.info(report.line())
    return report
