"""Recovery without restart: replicas first, then the last in-memory snapshot and a replay.

When workers die, the survivors settle at the last committed step and the job moves to the best
layout for what is left, taking lost shards from surviving replicas (a live reshard along the
policy's plan). If some shard has no live replica, every rank is rebuilt from the newest state that
still exists, in this order, and the steps since then are replayed:

1. the newest complete in-memory snapshot;
2. the newest on-disk checkpoint of this run (``checkpoint_dir``);
3. the run's start: the checkpoint it resumed from, or the seed (step 0).

The data cursor, the LR schedule and all randomness are functions of the step, so the replay is
exact, and a job survives losing any worker at any point, start-up included (a loss before the first
snapshot replays from the start; snapshots and replicas only make it cheaper).

``Recovery.recover`` returns what happened (``RecoveryOutcome``) and changes no controller state:
the controller's Recovering handler chooses the next state from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from elastic.core import checkpoint as ckpt
from elastic.core.layout import Placement
from elastic.driver.group import WorkerFailure, WorkerGroup
from elastic.driver.resharder import ReshardFailed, ReshardReport, frozen_from_disk, reshard
from elastic.driver.snapshots import Snapshotter
from elastic.model.specs import training_specs
from elastic.plan.costmodel import CostModel
from elastic.plan.policy import Policy


@dataclass(frozen=True)
class RecoveryOutcome:
    """One of: recovered onto ``placement`` (``how``, ``steps_lost``, ``step`` to resume at), paused
    (``pause`` says why), or interrupted by another loss (``again``)."""

    placement: Placement | None = None
    how: str = ""
    steps_lost: int = 0
    step: int = 0
    report: ReshardReport | None = None
    pause: str | None = None
    again: WorkerFailure | None = None


class Recovery:
    def __init__(self, group: WorkerGroup, policy: Policy, snapshots: Snapshotter,
                 checkpoint_dir: str | None = None, started_from: Path | None = None) -> None:
        self.group, self.policy, self.snapshots = group, policy, snapshots
        self.checkpoint_dir, self.started_from = checkpoint_dir, started_from

    def _decide(self, current: Placement, usable: list[int], remaining: int, dead: list[int], phase: str,
                alive: frozenset[int]):
        return self.policy.decide(current, usable, remaining, must_move=True,
                                  reason=f"recover from the loss of workers {dead}", phase=phase, alive=alive)

    def fallbacks(self, remaining: int, usable: list[int], phase: str) -> list[Placement]:
        """The placement recovery would move to (from replicas) after losing each one worker of the current
        placement: the skeletons worth building ahead. Same decision as ``recover`` makes, one worker short."""
        current, live, out = self.group.placement, self.group.live(), []
        for lost in current.workers if current is not None else ():
            try:
                decision = self._decide(current, [w for w in usable if w != lost], remaining, [lost], phase,
                                        live - {lost})
            except ValueError:
                continue
            if decision is None or decision.placement is None or decision.from_snapshot:
                continue
            if decision.placement not in out:
                out.append(decision.placement)
        return out

    def recover(self, failure: WorkerFailure, step: int, remaining: int, usable: list[int],
                phase: str) -> RecoveryOutcome:
        """Settle the survivors of ``failure`` and move to the best placement of ``usable`` workers."""
        group = self.group
        dead = sorted(failure.dead)
        if not dead:
            raise RuntimeError(f"a step failed with no worker lost, so retrying would fail again: {failure}")
        current = group.placement
        live = group.live()
        survivors = [w for w in current.workers if w in live]
        try:
            if survivors:
                group.settle(survivors)
            decision = self._decide(current, usable, remaining, dead, phase, live)
            if decision.placement is None:
                return RecoveryOutcome(pause=decision.describe())
            report, how, at = None, "replicas", step
            if decision.from_snapshot:
                how, at = self._rebuild(decision.placement)
            else:
                report = reshard(group, decision.plan, group.committed, decision.reason,
                                 frozen_from_disk(self.policy.cfg, self.policy.cost))
        except WorkerFailure as again:  # another loss while recovering: start over
            return RecoveryOutcome(again=again)
        except ReshardFailed as again:
            return RecoveryOutcome(again=again.failure or WorkerFailure({}, {-1: str(again)}))
        spares = [w for w in group.alive() if w not in decision.placement.workers and w in current.workers]
        group.release(spares, wait=False)
        return RecoveryOutcome(decision.placement, how, step - at, at, report)

    def _rebuild(self, placement: Placement) -> tuple[str, int]:
        """Build every rank of ``placement`` from the newest state that still exists; returns (how, its step)."""
        snap = self.snapshots.usable()
        checkpoint = self._newest_checkpoint()
        if snap is not None and (checkpoint is None or snap.step >= checkpoint.step):
            self.group.restore(snap, placement)
            return f"snapshot of step {snap.step}", snap.step
        if checkpoint is not None:
            self.group.load_checkpoint(checkpoint.folder, placement, checkpoint.step)
            return f"checkpoint of step {checkpoint.step}", checkpoint.step
        self.group.setup(placement, step=0)
        return "the seed (no replica, snapshot or checkpoint holds the lost shards)", 0

    def _newest_checkpoint(self) -> ckpt.Checkpoint | None:
        """The run's newest on-disk checkpoint, else the one it resumed from (sizes and coverage checked)."""
        cfg = self.policy.cfg
        for folder in (self._latest_in(self.checkpoint_dir), self.started_from):
            if folder is not None:
                try:
                    return ckpt.open_checkpoint(folder, cfg, training_specs(cfg), verify=False)
                except ckpt.CheckpointError:
                    continue
        return None

    @staticmethod
    def _latest_in(root: str | None) -> Path | None:
        if root is None:
            return None
        try:
            return ckpt.latest(Path(root))
        except ckpt.CheckpointError:
            return None


def redundancy_report(policy: Policy, cost: CostModel, budget: int, snapshot_every: int,
                      require_replica: bool) -> str:
    """What protects the state, and what it costs: replicas (dp >= 2) and/or snapshots."""
    layouts = policy.layouts(budget)
    replicated = [l for l in layouts if l.dp >= 2]
    text = []
    if layouts and replicated:
        best, best_rep = min(layouts, key=cost.step_seconds), min(replicated, key=cost.step_seconds)
        extra = cost.step_seconds(best_rep) / cost.step_seconds(best) - 1
        text.append(f"with {budget} workers the best layout keeping a replica is {best_rep} "
                    f"({extra:+.0%} predicted step time against {best})"
                    + ("; only such layouts are used" if require_replica else ""))
    else:
        text.append(f"no layout of {budget} workers keeps a replica")
    state_mb = sum(s.numel for s in policy.specs) * cost.itemsize / 1e6
    if snapshot_every:
        text.append(f"in-memory snapshot every {snapshot_every} steps: {state_mb:.1f} MB held in Ray's "
                    f"object store, a copy stall per snapshot, at most {snapshot_every - 1} steps replayed "
                    "after a loss without a replica")
    else:
        text.append("no snapshots: a loss without a surviving replica replays from the newest checkpoint, or from "
                    "the start")
    return "; ".join(text)
