"""Recovery without restart: replicas first, then the last in-memory snapshot and a replay.

When workers die, the survivors settle at the last committed step and the job moves to the best
layout for what is left, taking lost shards from surviving replicas (a live reshard along the
policy's plan). If some shard has no live replica, every rank is rebuilt from the newest complete
snapshot and the steps since then are replayed; the data cursor and the LR schedule are functions
of the step, so the replay is exact.

``Recovery.recover`` returns what happened (``RecoveryOutcome``) and changes no controller state:
the controller's Recovering handler chooses the next state from it. It raises RuntimeError only when
the training state is gone (no replica and no snapshot holds some shard), which ends the job.
"""

from __future__ import annotations

from dataclasses import dataclass

from elastic.core.layout import Placement
from elastic.driver.group import WorkerFailure, WorkerGroup
from elastic.driver.resharder import ReshardFailed, ReshardReport, reshard
from elastic.driver.snapshots import Snapshotter
from elastic.plan.costmodel import CostModel
from elastic.plan.planner import covers
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
    def __init__(self, group: WorkerGroup, policy: Policy, snapshots: Snapshotter) -> None:
        self.group, self.policy, self.snapshots = group, policy, snapshots

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
            decision = self.policy.decide(current, usable, remaining, must_move=True,
                                          reason=f"recover from the loss of workers {dead}", phase=phase, alive=live)
            if decision.placement is None:
                if not self.state_survives(current):
                    raise RuntimeError(f"lost workers {dead} held shards that no survivor and no snapshot has; the "
                                       "training state is gone. Resume from an on-disk checkpoint (--resume), and "
                                       "run with --snapshot-every or a layout with dp >= 2 to survive this")
                return RecoveryOutcome(pause=decision.describe())
            report, how, lost, at = None, "replicas", 0, step
            if decision.from_snapshot:
                snap = self.snapshots.usable()
                if snap is None:
                    raise RuntimeError(f"lost workers {dead} held shards that no replica and no snapshot holds. Run "
                                       "with snapshot_every > 0 or a layout with dp >= 2 to survive this loss")
                group.restore(snap, decision.placement)
                how, lost, at = f"snapshot of step {snap.step}", step - snap.step, snap.step
            else:
                report = reshard(group, decision.plan, group.committed, decision.reason)
        except WorkerFailure as again:  # another loss while recovering: start over
            return RecoveryOutcome(again=again)
        except ReshardFailed as again:
            return RecoveryOutcome(again=again.failure or WorkerFailure({}, {-1: str(again)}))
        spares = [w for w in group.alive() if w not in decision.placement.workers and w in current.workers]
        group.release(spares, wait=False)
        return RecoveryOutcome(decision.placement, how, lost, at, report)

    def state_survives(self, placement: Placement) -> bool:
        """Whether the live workers (or the snapshot) still hold every shard of ``placement``."""
        if self.snapshots.usable(wait_s=0) is not None:
            return True
        return covers(placement, self.policy.specs, self.policy.cfg.model.n_layers, self.group.live())


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
        text.append("no snapshots: a loss without a surviving replica ends the job")
    return "; ".join(text)
