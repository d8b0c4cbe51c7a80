"""Recovery without restart: where to go after a loss, and where lost state comes back from.

When workers die, the survivors settle at the last committed step and the policy chooses the best
placement for what is left (``Recovery.decide``). That answer is an ordinary ``Move`` and goes through
the controller's Resharding state like any other move: lost shards come from surviving replicas along
the policy's plan. If some shard has no live replica (``Move.rebuild``), every rank is rebuilt from the
newest state that still exists (``Recovery.rebuild``), in this order, and the steps since then are
replayed:

1. the newest complete in-memory snapshot;
2. the newest on-disk checkpoint of this run (``control.checkpoint_dir``);
3. the run's start: the checkpoint it resumed from, or the seed (step 0).

The data cursor, the LR schedule and all randomness are functions of the step, so the replay is
exact, and a job survives losing any worker at any point, start-up included (a loss before the first
snapshot replays from the start; snapshots and replicas only make it cheaper).

``fallbacks`` names the placements recovery would choose after losing each one worker, so that their
skeletons can be built ahead. Nothing here changes controller state.
"""

from __future__ import annotations

import logging
from pathlib import Path

from elastic.control.memory_budget import see_cluster
from elastic.core import checkpoint as ckpt
from elastic.core.layout import Placement
from elastic.driver.group import WorkerFailure, WorkerGroup
from elastic.driver.snapshots import Snapshotter
from elastic.model.specs import training_specs
from elastic.plan.decisions import Decision, Move
from elastic.plan.policy import Policy

log = logging.getLogger(__name__)
LOST_OBJECT = ("ObjectLostError", "ObjectReconstructionFailed", "OwnerDiedError", "ObjectFetchTimedOutError")


def _part_lost(why: str) -> bool:
    """Whether a worker's failure says a snapshot part it was reading is gone from Ray's object store."""
    return any(name in why for name in LOST_OBJECT)


class Recovery:
    def __init__(self, group: WorkerGroup, policy: Policy, snapshots: Snapshotter,
                 checkpoint_dir: Path | None = None, started_from: Path | None = None) -> None:
        self.group, self.policy, self.snapshots = group, policy, snapshots
        self.checkpoint_dir, self.started_from = checkpoint_dir, started_from

    def _decide(self, usable: list[int], remaining: int, dead: list[int], phase: str,
                alive: frozenset[int]) -> Decision:
        see_cluster(self.policy, self.group)
        return self.policy.decide(self.group.placement, usable, remaining, must_move=True,
                                  reason=f"recover from the loss of workers {dead}", phase=phase, alive=alive)

    def decide(self, failure: WorkerFailure, remaining: int, usable: list[int], phase: str) -> Decision:
        """Settle the survivors of ``failure`` at the committed step, then the policy's answer for ``usable``
        workers (a ``Move`` or a ``Pause``). Raises ``WorkerFailure`` if another worker dies meanwhile."""
        current, live = self.group.placement, self.group.live()
        survivors = [w for w in current.workers if w in live]
        if survivors:
            self.group.settle(survivors)
        return self._decide(usable, remaining, sorted(failure.dead), phase, live)

    def fallbacks(self, remaining: int, usable: list[int], phase: str) -> list[Placement]:
        """The placement recovery would move to (from replicas) after losing each one worker of the current
        placement: the skeletons worth building ahead. Same decision as ``decide`` makes, one worker short."""
        current, live, out = self.group.placement, self.group.live(), []
        for lost in current.workers if current is not None else ():
            decision = self._decide([w for w in usable if w != lost], remaining, [lost], phase, live - {lost})
            if isinstance(decision, Move) and not decision.rebuild and decision.placement not in out:
                out.append(decision.placement)
        return out

    def rebuild(self, placement: Placement) -> tuple[str, int]:
        """Build every rank of ``placement`` from the newest state that still exists; returns (how, its step)."""
        snap = self.snapshots.usable()
        checkpoint = self._newest_checkpoint()
        if snap is not None and (checkpoint is None or snap.step >= checkpoint.step):
            try:
                self.group.restore(snap, placement)
                return f"snapshot of step {snap.step}", snap.step
            except WorkerFailure as failure:
                if failure.dead or not _part_lost(failure.failed.get(failure.first, "")):  # the others were cut
                    raise
                # Ray lost a part (its only copy died with a node): this snapshot cannot serve, the next can.
                log.warning("snapshot of step %d lost a part (%s); rebuilding from the next source", snap.step,
                            failure)
                self.snapshots.discard(snap)
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
    def _latest_in(root: Path | None) -> Path | None:
        if not root:
            return None
        try:
            return ckpt.latest(Path(root))
        except ckpt.CheckpointError:
            return None
