"""Drive a live reshard across the worker group: the policy's plan, transferred, then committed.

1. The plan comes with the policy's decision (``Decision.plan``): the same plan the cost model priced.
   ``memory_rounds.transfer_work`` gives each worker only its own transfers, in byte-bounded rounds.
2. Transfer: the workers with remote pieces meet in a standalone gloo group and move them point to
   point; everybody else only copies locally. The old engines are not touched, so if anything fails
   here (a destination dies, say) the old placement is still whole.
3. Commit: each worker of the new placement leaves the old group, joins the new one and builds its
   engine from the transferred tensors; drained workers drop their shards.

Surviving processes keep their PIDs throughout, and nothing is written to disk.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from elastic.core.layout import Placement
from elastic.driver.group import WorkerFailure, WorkerGroup
from elastic.model.specs import itemsize, param_specs, training_specs
from elastic.plan.memory_rounds import transfer_work
from elastic.plan.planner import Plan, cached_plan

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
    bytes_moved: int  # between processes (pieces read from the base folder are not counted)
    bytes_copied: int
    max_worker_bytes: int
    peak_buffer_bytes: int
    bytes_read: int = 0  # frozen base pieces read from the base folder
    workers: dict = field(default_factory=dict)

    def line(self) -> str:
        return (f"reshard {self.old} -> {self.new} ({self.reason}) at step {self.step}: "
                f"{self.total_seconds * 1000:.0f} ms, {self.bytes_moved / 1e6:.1f} MB moved, "
                f"{self.bytes_copied / 1e6:.1f} MB kept local")


def plan_move(group: WorkerGroup, new: Placement, alive: frozenset[int] | None = None) -> Plan:
    """The plan from the group's placement to ``new``, for callers that pick a placement themselves
    (benchmarks, tests); the controller takes the policy's plan instead."""
    cfg = group.cfg
    return cached_plan(group.placement, new, tuple(training_specs(cfg)), cfg.model.n_layers, itemsize(cfg), alive,
                       cfg.runtime.reshard_chunk_bytes)


def frozen_from_disk(cfg, cost=None) -> frozenset[str]:
    """The frozen tensors a reshard reads from the base folder instead of a peer: a LoRA run's base weights
    when ``train.init_from`` names the folder they were loaded from (they never change), and
    ``runtime.base_from`` (or, on auto, the cost model) prefers the disk."""
    if not cfg.train.init_from or cfg.runtime.base_from == "peer":
        return frozenset()
    if cfg.runtime.base_from == "auto" and cost is not None and not cost.base_from_disk():
        return frozenset()
    return frozenset(s.name for s in param_specs(cfg) if not s.trainable)


def reshard(group: WorkerGroup, plan: Plan, step: int, reason: str,
            from_disk: frozenset[str] = frozenset(), round_bytes: int = 0) -> ReshardReport:
    """Move the job from ``plan.old`` (the group's placement) to ``plan.new`` at optimizer step ``step``;
    remote pieces of the tensors in ``from_disk`` are read from the base folder (``frozen_from_disk``).
    ``round_bytes``: what a worker may send plus receive per round (the policy's ``Move.round_bytes``, from
    the headroom of the workers taking part; 0: ``runtime.reshard_round_bytes``).

    Raises ReshardFailed if a transfer fails (``old_intact`` says whether the old placement still
    trains), and WorkerFailure if a worker dies while committing (the job must then recover).
    """
    started = time.perf_counter()
    old, new = group.placement, plan.new
    if plan.old != old:
        raise ValueError(f"the plan moves from {plan.old}, but the job is on {old}; plan again")
    work = transfer_work(plan, round_bytes or group.cfg.runtime.reshard_round_bytes, from_disk)
    planned = time.perf_counter()
    try:
        stats = group.transfer(new, work, step)
    except WorkerFailure as failure:
        group.cancel_transfer(sorted(set(new.workers) | set(work.movers)))
        live = group.live()
        old_alive = old is not None and all(w in live for w in old.workers)
        raise ReshardFailed(f"reshard {old} -> {new} failed during transfer: {failure}", old_alive, failure) from None
    transferred = time.perf_counter()
    commits = group.commit(new)
    for w, phases in commits.items():
        stats.setdefault(w, {})["commit"] = phases
    live = group.live()
    drained = [w for w in (old.workers if old else ()) if w not in new.workers and w in live]
    if drained:
        group.release(drained)
    done = time.perf_counter()

    by_worker: dict[int, list[int]] = {}
    for t in plan.remote:
        if t.tensor not in from_disk:
            by_worker.setdefault(t.src, [0, 0])[0] += t.nbytes
            by_worker.setdefault(t.dst, [0, 0])[1] += t.nbytes
    report = ReshardReport(
        old=str(old.layout) if old else "-", new=str(new.layout), reason=reason, step=step,
        plan_seconds=planned - started, transfer_seconds=transferred - planned, commit_seconds=done - transferred,
        total_seconds=done - started,
        bytes_moved=plan.bytes_moved() - sum(t.nbytes for t in plan.remote if t.tensor in from_disk),
        bytes_read=sum(s.get("disk_bytes", 0) for s in stats.values()),
        bytes_copied=sum(t.nbytes for t in plan.transfers if t.local),
        max_worker_bytes=max((s + r for s, r in by_worker.values()), default=0),
        peak_buffer_bytes=max((s.get("peak_buffer_bytes", 0) for s in stats.values()), default=0),
        workers=stats)
    log.debug(report.line())  # the controller's journal reports it to the user
    return report
