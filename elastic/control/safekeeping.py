"""What protects the job's state besides replicas: in-memory snapshots and on-disk checkpoints.

Both are taken only at the workload's restart points (multiples of its ``restart_every``; GRPO: its step
boundaries), because a workload may keep driver-side state between them that the workers' tensors do not
hold. So ``snapshot_every`` and ``checkpoint_every`` are rounded up to multiples of it, and a resume folder
must sit at one. ``Safekeeping.after_step`` takes whatever is due after a committed step; the controller
calls it and turns a loss during either into a recovery. ``redundancy_report`` says at start what protects
the state and what that costs.
"""

from __future__ import annotations

from pathlib import Path

from elastic.control.config import ControlConfig
from elastic.core import checkpoint as ckpt
from elastic.core.config import Config
from elastic.core.records import RecordKind
from elastic.driver.checkpoints import checkpoint_folder, save_checkpoint
from elastic.driver.group import WorkerFailure, WorkerGroup
from elastic.driver.snapshots import Snapshotter
from elastic.model.specs import training_specs
from elastic.plan.costmodel import CostModel
from elastic.plan.policy import Policy


def restart_interval(every: int, restart_every: int) -> int:
    """``every`` rounded up to a multiple of ``restart_every`` (0 stays 0: off)."""
    return -(-every // restart_every) * restart_every if every > 0 else 0


def resume_folder(cfg: Config, control: ControlConfig, restart_every: int, workload: str) -> Path | None:
    """The checkpoint folder to resume from, validated whole (checksums included) before any worker starts."""
    if not control.resume:
        return None
    folder = checkpoint_folder(Path(control.resume))
    step = ckpt.open_checkpoint(folder, cfg, training_specs(cfg), verify=True).step
    if step % restart_every and step < cfg.train.steps:
        raise ValueError(f"{folder} holds step {step}, which is not a restart point of the {workload} workload "
                         f"(a multiple of {restart_every} steps): the state it needs between those points is not "
                         "in a checkpoint; resume from an earlier one")
    return folder


class Safekeeping:
    def __init__(self, group: WorkerGroup, control: ControlConfig, restart_every: int) -> None:
        self.group, self.control, self.restart_every = group, control, restart_every
        self.snapshot_every = restart_interval(control.snapshot_every, restart_every)
        self.checkpoint_every = restart_interval(control.checkpoint_every, restart_every)
        self.snapshots = Snapshotter(group, self.snapshot_every)

    def after_step(self, step: int, steps: int, record) -> tuple[str, WorkerFailure] | None:
        """Write a checkpoint and take a snapshot if due at committed step ``step``; ``record(kind, text, **)``
        journals the checkpoint. A worker lost meanwhile returns (what was going on, the failure); the previous
        checkpoint and snapshot stay the latest."""
        every, root = self.checkpoint_every, self.control.checkpoint_dir
        if root and every and (step % every == 0 or step == steps):
            try:
                folder, seconds = save_checkpoint(self.group, Path(root))
            except WorkerFailure as failure:
                return "during checkpoint", failure
            record(RecordKind.CHECKPOINT, f"wrote {folder} in {seconds:.2f} s", path=str(folder))
        if self.snapshots.due(step) and step < steps:
            try:
                self.snapshots.take()
            except WorkerFailure as failure:
                return "during snapshot", failure
        return None

    def rounding_note(self, workload: str) -> str:
        """A note when the intervals asked for were rounded up to restart points ("" when none was)."""
        rounded = [f"{what} {asked} -> {used}" for what, asked, used in (
            ("snapshot_every", self.control.snapshot_every, self.snapshot_every),
            ("checkpoint_every", self.control.checkpoint_every, self.checkpoint_every)) if asked != used]
        if not rounded:
            return ""
        return (f"; snapshots and checkpoints only at the {workload} workload's restart points "
                f"(every {self.restart_every} steps): {', '.join(rounded)}")


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
