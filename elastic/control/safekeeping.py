"""What protects the job's state besides replicas: in-memory snapshots and on-disk checkpoints, on by default.

- **Snapshots** (``snapshot_every``): on auto they are taken only while the placement holds some shard with no
  replica on another node (dp = 1, or replicas that share a node), and as often as keeps the copy's stall under
  ``snapshot_share`` of the step time: every ``ceil(stall / (share * step))`` steps, with the stall and the
  step measured once they have been (predicted from the state's size and the cost model before). A loss
  without a replica then replays at most one interval.
- **Checkpoints** go to ``checkpoint_dir`` (auto: the run's ``RUN_DIR/checkpoints``), every
  ``checkpoint_minutes`` of training on auto, and once at the end of the run; they are written in the
  background (``driver/checkpoints.CheckpointWriter``), and the newest ``keep_checkpoints`` are kept. They
  serve a recovery that has neither replica nor snapshot, and a re-run of the job after its driver was lost.

Both are taken only at the workload's restart points (multiples of its ``restart_every``; GRPO: its step
boundaries), because a workload may keep driver-side state between them that the workers' tensors do not
hold: intervals are rounded up to multiples of it, and a resume folder must sit at one.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from elastic.control.config import ControlConfig
from elastic.core import checkpoint as ckpt
from elastic.core.config import Config
from elastic.core.records import RecordKind
from elastic.driver.checkpoints import CheckpointWriter, checkpoint_folder
from elastic.driver.group import WorkerFailure, WorkerGroup
from elastic.driver.snapshots import Snapshotter
from elastic.model.specs import training_specs

COPY_BYTES_PER_S = 1e9  # a conservative memcpy rate for the first snapshot's predicted stall (measured after)


def restart_interval(every: int, restart_every: int) -> int:
    """``every`` rounded up to a multiple of ``restart_every`` (0 stays 0: off)."""
    return -(-every // restart_every) * restart_every if every > 0 else 0


def checkpoint_root(control: ControlConfig, run_dir: str | Path | None) -> Path | None:
    """Where this run's checkpoints go: ``control.checkpoint_dir``, or on auto ``RUN_DIR/checkpoints`` (None when
    the run has no run folder, or checkpoints are off)."""
    if control.checkpoint_dir == "auto":
        return Path(run_dir) / "checkpoints" if run_dir else None
    return Path(control.checkpoint_dir) if control.checkpoint_dir else None


def resume_folder(cfg: Config, control: ControlConfig, root: Path | None, restart_every: int,
                  workload: str) -> Path | None:
    """The checkpoint folder to resume from (``control.resume``; auto: the newest in ``root`` if there is one),
    validated whole (checksums included) before any worker starts."""
    if not control.resume or (control.resume == "auto" and (root is None or not (root / "latest").is_file())):
        return None
    folder = checkpoint_folder(root if control.resume == "auto" else Path(control.resume))
    step = ckpt.open_checkpoint(folder, cfg, training_specs(cfg), verify=True).step
    if step % restart_every and step < cfg.train.steps:
        raise ValueError(f"{folder} holds step {step}, which is not a restart point of the {workload} workload "
                         f"(a multiple of {restart_every} steps): the state it needs between those points is not "
                         "in a checkpoint; resume from an earlier one")
    return folder


class Safekeeping:
    def __init__(self, group: WorkerGroup, control: ControlConfig, restart_every: int, root: Path | None,
                 writer: str) -> None:
        self.group, self.control, self.restart_every, self.root = group, control, restart_every, root
        self.snapshots = Snapshotter(group, 0)
        self.checkpoints = CheckpointWriter(group, root, writer, control.keep_checkpoints) if root else None
        self.checkpoint_every = restart_interval(control.checkpoint_every, restart_every)
        self._last_checkpoint = time.monotonic()
        if root is not None:
            ckpt.writable(root)
            ckpt.sweep(root, writer)

    # ---- snapshots ----------------------------------------------------------------------------
    def snapshot_interval(self, covered: bool, step_seconds: float, state_bytes: int) -> int:
        """Steps between snapshots now (0: none); ``covered``: every shard has a replica on another node."""
        every = self.control.snapshot_every
        if every >= 0:
            return restart_interval(every, self.restart_every)
        if covered:
            return 0
        stall = self.snapshots.last_stall or state_bytes / COPY_BYTES_PER_S
        steps = math.ceil(stall / (self.control.snapshot_share * max(step_seconds, 1e-9)))
        return restart_interval(max(1, steps), self.restart_every)

    # ---- after each committed step -----------------------------------------------------------------
    def after_step(self, step: int, steps: int, snapshot_every: int, record) -> tuple[str, WorkerFailure] | None:
        """Finish or start a checkpoint, and take a snapshot (every ``snapshot_every`` steps), as due at committed
        step ``step``; ``record(kind, text, **)`` journals them. A worker lost meanwhile returns (what was going
        on, the failure); the previous checkpoint and snapshot stay the latest."""
        try:
            self._checkpoint(step, steps, record)
        except WorkerFailure as failure:
            return "during checkpoint", failure
        self.snapshots.every = snapshot_every
        self.snapshots.poll()
        if step % self.restart_every == 0 and self.snapshots.due(step) and step < steps:
            try:
                self.snapshots.take()
            except WorkerFailure as failure:
                return "during snapshot", failure
        return None

    def snapshot_now(self, step: int, wait_s: float) -> str:
        """Take a snapshot of committed step ``step`` now, unless one of it exists, and wait up to ``wait_s`` for
        it to be held off its workers' nodes; returns what happened, for the journal. For a drain whose notice
        ends before the live move is predicted to: if the node goes mid-move, the recovery restores this
        snapshot and replays nothing. Raises ``WorkerFailure`` if a worker dies while copying."""
        if step % self.restart_every:
            return f"no snapshot: step {step} is not a restart point of the workload (every {self.restart_every})"
        snaps = self.snapshots
        newest = snaps.inflight or snaps.latest
        if newest is None or newest.step != step:
            snaps.usable(wait_s)  # one travels at a time: the one in flight lands (or is dropped) first
            if snaps.take() is None:
                return f"no snapshot of step {step}: the previous one is still travelling"
        started = time.monotonic()
        held = snaps.usable(wait_s)
        if held is None or held.step != step:
            return f"a snapshot of step {step} was taken but is not yet off its nodes after {wait_s:.1f} s"
        return f"a snapshot of step {step} is held off the nodes (waited {time.monotonic() - started:.2f} s)"

    def _checkpoint(self, step: int, steps: int, record) -> None:
        writer = self.checkpoints
        if writer is None or self.control.checkpoint_every == 0 or step >= steps:  # the last one is final()'s
            return
        done = writer.poll()
        if done is not None:
            record(RecordKind.CHECKPOINT, f"wrote {done[0]} in {done[1]:.2f} s (in the background)", path=str(done[0]))
        every = self.checkpoint_every
        due = step % self.restart_every == 0 and ((every > 0 and step % every == 0) or (
            every < 0 and time.monotonic() - self._last_checkpoint >= 60 * self.control.checkpoint_minutes))
        if not due or writer.inflight is not None:  # one at a time: the next step looks again
            return
        stall = writer.begin()
        self._last_checkpoint = time.monotonic()
        record(RecordKind.CHECKPOINT, f"checkpoint of step {step} started ({stall:.2f} s copy)", of_step=step)

    def final(self, step: int, record) -> None:
        """At the end of the run (or a stop): finish the checkpoint in flight and write the final state, and wait,
        so that it is on disk before the job says it is done. Raises ``WorkerFailure`` if a worker dies."""
        writer = self.checkpoints
        if writer is None or self.control.checkpoint_every == 0 or step % self.restart_every:
            return
        writer.wait()
        try:
            if ckpt.latest(writer.root).name == f"step_{step:06d}":
                return
        except ckpt.CheckpointError:
            pass
        writer.begin()
        folder, seconds = writer.wait()
        record(RecordKind.CHECKPOINT, f"wrote {folder} in {seconds:.2f} s (the final state)", path=str(folder))

    def rounding_note(self, workload: str) -> str:
        """A note when the intervals asked for were rounded up to restart points ("" when none was)."""
        rounded = [f"{what} {asked} -> {restart_interval(asked, self.restart_every)}" for what, asked in (
            ("snapshot_every", self.control.snapshot_every), ("checkpoint_every", self.control.checkpoint_every))
            if asked > 0 and restart_interval(asked, self.restart_every) != asked]
        if not rounded:
            return ""
        return (f"; snapshots and checkpoints only at the {workload} workload's restart points "
                f"(every {self.restart_every} steps): {', '.join(rounded)}")


def redundancy_report(policy, cost, budget: int, control: ControlConfig, root: Path | None,
                      require_replica: bool) -> str:
    """What protects the state, and what it costs: replicas (dp >= 2), snapshots and checkpoints."""
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
    every = control.snapshot_every
    if every < 0:
        text.append(f"snapshots (auto) while a shard has no replica on another node, keeping their stall under "
                    f"{control.snapshot_share:.0%} of a step; {state_mb:.1f} MB held in Ray's object store")
    elif every:
        text.append(f"in-memory snapshot every {every} steps: {state_mb:.1f} MB in Ray's object store, at most "
                    f"{every - 1} steps replayed after a loss without a replica")
    else:
        text.append("no snapshots: a loss without a surviving replica replays from the newest checkpoint, or from "
                    "the start")
    if root is None:
        text.append("no checkpoints (no checkpoint_dir): a lost driver loses the job")
    else:
        when = (f"every {control.checkpoint_minutes:g} min" if control.checkpoint_every < 0 else
                f"every {control.checkpoint_every} steps" if control.checkpoint_every else "never")
        text.append(f"checkpoints to {root} {when} and at the end (newest {control.keep_checkpoints or 'all'} kept)")
    return "; ".join(text)
