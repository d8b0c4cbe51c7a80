"""The controller: an explicit state machine that trains, watches events and reshards live.

The states, their payloads and the allowed transitions are in ``states.py`` (with the diagram).
``tick()`` runs the current state's handler once; the handler returns the next state, and only the
handlers choose it (helpers return values). ``_set_state`` checks the transition against the table,
records it in the journal (``events.jsonl``), calls the listeners and publishes the job's status.

Events are acted on only between steps. New workers start and warm up in the background while
training continues; training stalls only for the state transfer itself. Every decision is logged
with its reason and the cost model's figures.

Snapshots and checkpoints are taken only at the workload's restart points (multiples of its
``restart_every``; GRPO: its step boundaries), so ``snapshot_every`` and ``checkpoint_every`` are
rounded up to multiples of it, and a resume folder must sit at one (``restart_interval``).

Collaborators: the worker group (``driver/group.py``), the policy and cost model (``plan/``), the
inbox (events in, answers out), the wishes (budget, drains, phase, pause), recovery, the snapshotter
and the journal. The controller talks to workers only through the ``WorkerGroup`` protocol, so the
controller tests run it on a fake group in one process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from elastic.control.events import Event
from elastic.control.inbox import Inbox, PlaneLink
from elastic.control.journal import Journal
from elastic.control.recovery import Recovery, redundancy_report
from elastic.control.sources import ClusterWatcher
from elastic.control.states import (
    Done,
    Finishing,
    Launching,
    Paused,
    Planning,
    Recovering,
    Resharding,
    Resuming,
    Running,
    Transition,
    name,
)
from elastic.control.wishes import Wishes
from elastic.control.workload import LMWorkload, Workload
from elastic.core import checkpoint as ckpt
from elastic.core.config import Config
from elastic.core.data import check_data
from elastic.core.layout import Layout, Placement
from elastic.core.records import RecordKind
from elastic.driver.checkpoints import checkpoint_folder, resume_checkpoint, save_checkpoint
from elastic.driver.group import WorkerFailure, WorkerGroup
from elastic.driver.resharder import ReshardFailed, ReshardReport, frozen_from_disk, reshard
from elastic.driver.snapshots import Snapshotter
from elastic.driver.summary import StepSummary, summarize
from elastic.model.specs import training_specs
from elastic.plan.costmodel import CostModel
from elastic.plan.policy import Decision, Policy
from elastic.runtime.engine import DTYPE
from elastic.tools.metrics import MetricsWriter
from elastic.tools.progress import describe, log_above_bar, progress_bar

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run leaves: its steps, reshards, recoveries and journal, and the final tensors."""

    history: list[StepSummary]
    reshards: list[ReshardReport]
    recoveries: list[dict]
    events: list[dict]
    tensors: dict[str, torch.Tensor] | None
    seconds: float
    final_placement: Placement | None = None


@dataclass
class ControllerOptions:
    """How the controller behaves (the training itself is in Config)."""

    layout: Layout | None = None  # initial layout; None lets the policy choose
    objective: str = "cost"  # "cost": the cost model decides; "use_all": always run on every worker
    min_workers: int = 1  # below this the job pauses and waits
    max_workers: int = 64  # the most workers the job will use
    watch_cluster: bool = False  # turn Ray's cluster capacity into the worker budget
    poll_interval_s: float = 0.5  # how often the control plane and the cluster are polled
    job_name: str | None = None  # registers the named control-plane actor when set
    progress: bool = True
    gather_tensors: bool = True  # assemble the final full tensors on the driver
    # In-memory snapshot every k steps (0: none; then only replicas protect state). Both intervals are rounded up
    # to a multiple of the workload's restart_every (GRPO: grpo.num_iterations), see the module docstring.
    snapshot_every: int = 0
    require_replica: bool = False  # only layouts with dp >= 2, so any single loss recovers without replay
    checkpoint_dir: str | None = None  # where on-disk checkpoints go (only for restarting a whole job)
    checkpoint_every: int = 0  # write a checkpoint every k steps (0: never)
    resume: str | None = None  # a checkpoint folder, or a checkpoint_dir to resume its latest
    run_dir: str | None = None  # metrics.jsonl / events.jsonl / summary.json go here (see elastic.tools.metrics)
    phase_layouts: dict = field(default_factory=dict)  # phase -> Layout the operator wants for that phase
    sources: list = field(default_factory=list)  # extra event sources with poll(step) -> [Event]


@dataclass(frozen=True)
class Refusal:
    """The policy refused the request (an impossible layout): one line saying why."""

    text: str


def restart_interval(every: int, restart_every: int) -> int:
    """``every`` rounded up to a multiple of ``restart_every`` (0 stays 0: off)."""
    return -(-every // restart_every) * restart_every if every > 0 else 0


class Controller:
    def __init__(self, cfg: Config, options: ControllerOptions | None = None, group: WorkerGroup | None = None,
                 workload: Workload | None = None, policy: Policy | None = None,
                 plane: PlaneLink | None = None) -> None:
        self.cfg, self.opt = cfg, options or ControllerOptions()
        self._started = time.perf_counter()
        check_data(cfg)  # a bad data file, column or tokenizer fails here, before any worker starts
        self.workload = workload or LMWorkload()
        # Steps between the workload's restart points; snapshots and checkpoints are taken only there.
        self.restart_every = max(1, int(getattr(self.workload, "restart_every", 1)))
        self.snapshot_every = restart_interval(self.opt.snapshot_every, self.restart_every)
        self.checkpoint_every = restart_interval(self.opt.checkpoint_every, self.restart_every)
        if self.opt.resume:  # validate the whole checkpoint before any worker starts
            folder = checkpoint_folder(Path(self.opt.resume))
            step = ckpt.open_checkpoint(folder, cfg, training_specs(cfg), verify=True).step
            if step % self.restart_every and step < cfg.train.steps:
                raise ValueError(f"{folder} holds step {step}, which is not a restart point of the "
                                 f"{self.workload.name} workload (a multiple of {self.restart_every} steps): the state "
                                 "it needs between those points is not in a checkpoint; resume from an earlier one")
            self._resume_folder: Path | None = folder
        else:
            self._resume_folder = None
        self._owns_group = group is None  # a group passed in (a pool of warm workers) outlives this controller
        if group is None:
            from elastic.driver.ray_group import RayWorkerGroup

            group = RayWorkerGroup(cfg)
        group.cfg = cfg
        self.group = group
        itemsize = torch.empty((), dtype=DTYPE[cfg.train.dtype]).element_size()
        self.cost = CostModel(cfg.model, cfg.train.global_batch, cfg.data.seq_len, itemsize,
                              cores=group.cluster_cpus())
        self.policy = policy or Policy(cfg, self.cost, self.opt.objective, self.opt.min_workers,
                                       require_replica=self.opt.require_replica)
        self.policy.phase_filter.update(self.workload.phase_filters())
        self.snapshots = Snapshotter(group, self.snapshot_every)
        self.recovery = Recovery(group, self.policy, self.snapshots, self.opt.checkpoint_dir, self._resume_folder)
        self.wishes = Wishes(cfg.runtime.workers, self.opt.phase_layouts)
        sources = list(self.opt.sources)
        if self.opt.watch_cluster:
            sources.append(ClusterWatcher(cfg.runtime.cpus_per_worker, self.opt.max_workers, self.opt.poll_interval_s))
        if plane is None and self.opt.job_name:
            from elastic.control.control_plane import RayPlaneLink

            plane = RayPlaneLink(self.opt.job_name)
        self.inbox = Inbox(sources, plane, self.opt.poll_interval_s)
        self.metrics = MetricsWriter(self.opt.run_dir, append=bool(self.opt.resume)) if self.opt.run_dir else None
        self.journal = Journal(self.metrics, self._started)
        self.state = Planning()
        self.step = 0
        self.history: list[StepSummary] = []
        self.reshards: list[ReshardReport] = []
        self.recoveries: list[dict] = []
        self.listeners: list[Callable[[Transition], None]] = []  # called after every transition
        self._bar = None
        self._ahead: Resharding | None = None  # a move waiting for its skeleton, built while training goes on
        self._ahead_since = 0  # the step it was decided at
        self._handlers = {Planning: self._planning, Launching: self._launching, Resuming: self._resuming,
                          Resharding: self._resharding, Running: self._running, Recovering: self._recovering,
                          Paused: self._paused, Finishing: self._finishing}

    # ---- bookkeeping --------------------------------------------------------------------
    @property
    def events(self) -> list[dict]:
        return self.journal.entries

    @property
    def phase(self) -> str:
        return self.wishes.phase

    def record(self, kind: RecordKind, level: int = logging.INFO, **details) -> dict:
        return self.journal.record(kind, self.step, level, **details)

    def submit(self, event: Event) -> None:
        """Deliver an event from inside the driver (e.g. a workload's phase change)."""
        self.inbox.submit(event)

    def status(self) -> dict:
        placement = self.group.placement
        last = self.reshards[-1] if self.reshards else None
        return {"state": name(self.state), "step": self.step, "steps": self.cfg.train.steps,
                "layout": str(placement.layout) if placement else None,
                "workers": list(placement.workers) if placement else [],
                "starting": self.group.starting, "budget": self.wishes.budget, "phase": self.phase,
                "loss": self.history[-1].loss if self.history else None,
                "last_reshard": None if last is None else {
                    "from": last.old, "to": last.new, "reason": last.reason, "step": last.step,
                    "seconds": round(last.total_seconds, 3), "bytes": last.bytes_moved}}

    def _usable(self) -> list[int]:
        return [w for w in self.group.alive() if w not in self.wishes.draining]

    # ---- the state machine ----------------------------------------------------------------
    def tick(self) -> Transition:
        """Run the current state's handler once and move to the state it chose."""
        transition = Transition(self.state, self._handlers[type(self.state)](self.state)).check()
        self._set_state(transition)
        return transition

    def _set_state(self, transition: Transition) -> None:
        self.state = transition.next
        if transition.changes_state:
            self.record(RecordKind.TRANSITION, logging.DEBUG, text=transition.describe(),
                        **{"from": name(transition.previous), "to": name(transition.next)})
        for listener in self.listeners:
            listener(transition)
        self.inbox.publish(self.status())

    def _running(self, state: Running):
        if self._ahead is not None and (self.group.prepared(self._ahead.decision.placement) or
                                        self.step - self._ahead_since >= self.cfg.runtime.prepare_wait_steps):
            move, self._ahead = self._ahead, None
            return move
        ready = self.group.ready()
        if ready:
            self.record(RecordKind.WORKERS_READY, text=f"workers {ready} warmed up", workers=ready)
        events = self.inbox.poll(self.step)
        if events or ready:
            return Planning(tuple(events))
        if self.step >= self.cfg.train.steps:
            return Finishing("every step is done")
        placement, started = self.group.placement, time.perf_counter()
        try:
            results = self.workload.step(self)
        except WorkerFailure as failure:
            if failure.step_results is not None:  # every rank computed it before the loss: the step counts
                self._count_step(failure.step_results, placement, started, state.fresh)
            self.record(RecordKind.FAILURE, text=str(failure), dead=sorted(failure.dead))
            return Recovering(failure)
        if results is None:  # the workload did other work (a rollout) or asked for a phase change
            return state
        self._count_step(results, placement, started, state.fresh)
        if state.fresh and self.cfg.runtime.prepare_ahead:  # a new placement: get ready to lose any one worker
            self.group.prepare(self.recovery.fallbacks(self.cfg.train.steps - self.step, self._usable(), self.phase))
        failure = self._after_step()
        return Recovering(failure) if failure is not None else Running(fresh=False)

    def _planning(self, state: Planning):
        self._ahead = None  # a move still waiting for its skeleton is decided again
        events, group = list(state.events), self.group
        folded = self.wishes.fold(events, group.live(), len(self._usable()), len(group.starting),
                                  self.policy.validate_request)
        current = group.placement
        for event, why in folded.refused:
            self.inbox.answer([event], f"refused: {why}; training continues on "
                                       f"{current.layout if current else '-'}")
            self.record(RecordKind.REFUSED, text=why)
        if folded.cancel_starting:
            cancelled = group.cancel_starting(folded.cancel_starting)
            self.record(RecordKind.SCALE_IN, text=f"cancelled starting workers {cancelled}: "
                                                  f"budget is {self.wishes.budget}")
        for event in events:
            self.record(RecordKind.EVENT, text=event.describe(), type=event.kind.value)
        if folded.stop:
            self.inbox.answer(events, f"stopping at step {self.step}")
            self.record(RecordKind.STOP, text=f"stopping at step {self.step} on request")
            return Finishing("stopped on request")
        lost = sorted(w for w in (current.workers if current else ()) if w not in group.live())
        if lost:  # noticed outside a failing call (e.g. while forming): recover first, then plan
            return Recovering(WorkerFailure({w: "process died" for w in lost}, {}))
        if self.wishes.paused:
            self.inbox.answer(events, "paused")
            return Paused("paused by the operator")
        forced = folded.forced or (self.opt.layout if current is None else None)  # the first placement's layout
        outcome = self._decide(forced, folded.must_move, folded.reason)
        if isinstance(outcome, Refusal):
            self.inbox.answer(events, f"refused: {outcome.text}")
            self.record(RecordKind.REFUSED, text=outcome.text)
            return Running() if current else Paused(outcome.text)
        if outcome is None:
            self.inbox.answer(events, f"keep {current.layout} on {len(current.workers)} workers (no predicted gain)")
            self.record(RecordKind.KEEP, text=f"stay on {current.layout}: no layout is predicted to pay off")
            return Running()
        if outcome.placement is None:
            self.inbox.answer(events, outcome.describe())
            self.record(RecordKind.PAUSE, text=outcome.describe())
            return Paused(outcome.reason)
        wanted = outcome.placement.workers
        missing = [w for w in wanted if w < 0]
        if missing:
            started = group.start(len(missing))
            self.record(RecordKind.SCALE_OUT, text=f"starting workers {started} in the background for "
                                                   f"{outcome.describe()}")
        if missing or any(w in group.starting for w in wanted):
            self.inbox.answer(events, f"starting workers for {outcome.describe()}")
            return Running() if current else Paused("waiting for workers to warm up")
        self.record(RecordKind.DECISION, text=outcome.describe(), layout=str(outcome.placement.layout),
                    workers=list(wanted))
        if current is not None:
            if not self.cfg.runtime.prepare_ahead:
                return Resharding(outcome, tuple(events))
            # Build the next placement's skeleton while training goes on; move once it is ready.
            group.prepare([outcome.placement])
            if group.prepared(outcome.placement):
                return Resharding(outcome, tuple(events))
            self._ahead, self._ahead_since = Resharding(outcome, tuple(events)), self.step
            return Running()
        if self._resume_folder is not None:
            return Resuming(outcome, self._resume_folder, tuple(events))
        return Launching(outcome, tuple(events))

    def _decide(self, forced: Layout | None, must: bool, reason: str) -> Decision | Refusal | None:
        """The policy's answer for the workers at hand (None: stay where we are)."""
        current = self.group.placement
        # Offer the policy a budget's worth of workers: the current ones first, then spares, then
        # workers still warming up, then placeholders (negative ids) for workers not started yet.
        usable = sorted(self._usable(), key=lambda w: (current is None or current.rank_of(w) is None, w))
        pool = usable + self.group.starting
        budget = self.wishes.budget
        candidates = (pool + [-(i + 1) for i in range(max(0, budget - len(pool)))])[:budget]
        try:
            return self.policy.decide(current, candidates, self.cfg.train.steps - self.step, forced, must, reason,
                                      self.phase, alive=self.group.live())
        except ValueError as err:
            return Refusal(str(err))

    def _launching(self, state: Launching):
        placement = state.decision.placement
        try:
            seconds = self.group.setup(placement, step=self.step)
        except WorkerFailure as failure:
            if not failure.dead:
                raise
            self.record(RecordKind.FAILURE, text=f"while forming the first placement: {failure}",
                        dead=sorted(failure.dead))
            return Planning(state.requests)
        self.record(RecordKind.START,
                    text=f"{placement.layout} on workers {list(placement.workers)} in {seconds:.2f} s")
        self.inbox.answer(state.requests, f"started {state.decision.describe()}")
        return Running(fresh=True)

    def _resuming(self, state: Resuming):
        placement = state.decision.placement
        try:
            self.step = resume_checkpoint(self.group, state.folder, placement, verify=False)  # verified at start
        except WorkerFailure as failure:
            if not failure.dead:
                raise
            self.record(RecordKind.FAILURE, text=f"while resuming: {failure}", dead=sorted(failure.dead))
            return Planning(state.requests)
        self.record(RecordKind.RESUME, text=f"{placement.layout} on workers {list(placement.workers)} from "
                                            f"{state.folder} at step {self.step}")
        self.inbox.answer(state.requests, f"resumed on {state.decision.describe()}")
        return Running(fresh=True)

    def _resharding(self, state: Resharding):
        decision = state.decision
        try:
            report = reshard(self.group, decision.plan, self.step, decision.reason,
                             frozen_from_disk(self.cfg, self.cost))
        except ReshardFailed as err:
            self.inbox.answer(state.requests, f"reshard to {decision.placement.layout} failed: {err}")
            self.record(RecordKind.RESHARD_FAILED, text=str(err))
            return Running() if err.old_intact else Recovering(err.failure)
        except WorkerFailure as failure:  # a worker died while committing the new placement
            self.record(RecordKind.RESHARD_FAILED, text=f"during commit: {failure}")
            return Recovering(failure)
        self.reshards.append(report)
        self.cost.observe_reshard(report.max_worker_bytes, report.transfer_seconds,
                                  report.plan_seconds + report.commit_seconds)
        disk = [(w.get("disk_bytes", 0), w.get("disk_seconds", 0.0)) for w in report.workers.values()]
        if disk:
            self.cost.observe_disk(*max(disk))
        self.record(RecordKind.RESHARD, text=report.line(), seconds=report.total_seconds, bytes=report.bytes_moved,
                    old=report.old, new=report.new, reason=report.reason)
        self.inbox.answer(state.requests, f"moved to {decision.describe()}; {report.line()}")
        self._let_go(decision.placement)
        return Running(fresh=True)

    def _let_go(self, placement: Placement) -> None:
        """Drained workers and workers beyond the budget leave once their shards have moved."""
        alive = self.group.alive()
        idle = [w for w in alive if w not in placement.workers]
        surplus = idle[: max(0, len(alive) - self.wishes.budget)]
        leaving = sorted({w for w in idle if w in self.wishes.draining} | set(surplus))
        if leaving:
            self.group.remove(leaving)
            self.wishes.draining -= set(leaving)
            self.record(RecordKind.DRAINED, text=f"workers {leaving} left after their shards moved", workers=leaving)

    def _recovering(self, state: Recovering):
        started = time.perf_counter()
        self._ahead = None
        self.wishes.forget(state.failure.dead)
        outcome = self.recovery.recover(state.failure, self.step, self.cfg.train.steps - self.step, self._usable(),
                                        self.phase)
        if outcome.again is not None:
            self.record(RecordKind.FAILURE, text=f"during recovery: {outcome.again}", dead=sorted(outcome.again.dead))
            return Recovering(outcome.again)
        if outcome.pause is not None:
            self.record(RecordKind.PAUSE, text=outcome.pause)
            return Paused(outcome.pause)
        if outcome.report is not None:
            self.reshards.append(outcome.report)
        self.step = outcome.step
        missing = self.wishes.budget - len(self._usable()) - len(self.group.starting)
        if missing > 0:  # grow back towards the budget in the background (the job trains meanwhile)
            started_ids = self.group.start(missing)
            self.record(RecordKind.SCALE_OUT, text=f"starting replacement workers {started_ids} in the background")
        seconds = time.perf_counter() - started
        dead = sorted(state.failure.dead)
        lost, placement = outcome.steps_lost, outcome.placement
        self.recoveries.append({"dead": dead, "seconds": seconds, "how": outcome.how, "steps_lost": lost,
                                "layout": str(placement.layout), "step": self.step})
        self.record(RecordKind.RECOVERED, text=f"lost workers {dead}; now {placement.layout} on workers "
                                               f"{list(placement.workers)} from {outcome.how} in {seconds:.2f} s"
                                               + (f", replaying {lost} steps" if lost else ""),
                    seconds=seconds, how=outcome.how, steps_lost=lost)
        return Running(fresh=True)

    def _finishing(self, state: Finishing):
        tensors = None
        if self.opt.gather_tensors:
            try:
                tensors = self.group.gather_tensors()[1]
            except WorkerFailure as failure:  # recover, and gather again from the survivors
                self.record(RecordKind.FAILURE, text=f"while gathering the final tensors: {failure}",
                            dead=sorted(failure.dead))
                return Recovering(failure)
        return Done(state.reason, tensors)

    def _paused(self, state: Paused):
        events = self.inbox.poll(self.step, force=True)
        if events or self.group.ready():
            return Planning(tuple(events))
        time.sleep(self.opt.poll_interval_s)
        return state

    # ---- steps ------------------------------------------------------------------------------
    def _count_step(self, results: dict, placement: Placement, started: float, fresh: bool) -> None:
        summary = summarize(results, placement, time.perf_counter() - started)
        self.history = [h for h in self.history if h.step < summary.step]  # a replayed step replaces its first try
        self.history.append(summary)
        if self.metrics is not None:
            self.metrics.step(summary)
        if not fresh:  # a placement's first step pays one-off costs; do not calibrate on it
            self.cost.observe_step(placement.layout, summary.seconds)
        self.step += 1
        if self._bar is not None:
            self._bar.set_postfix(describe(summary), refresh=False)
            self._bar.n = self.step
            self._bar.refresh()

    def _after_step(self) -> WorkerFailure | None:
        """A checkpoint and a snapshot when due; the failure, if a worker died during either."""
        every, steps = self.checkpoint_every, self.cfg.train.steps  # multiples of the workload's restart points
        if self.opt.checkpoint_dir and every and (self.step % every == 0 or self.step == steps):
            try:
                folder, seconds = save_checkpoint(self.group, Path(self.opt.checkpoint_dir))
            except WorkerFailure as failure:  # the previous complete checkpoint stays the latest
                self.record(RecordKind.FAILURE, text=f"during checkpoint: {failure}", dead=sorted(failure.dead))
                return failure
            self.record(RecordKind.CHECKPOINT, text=f"wrote {folder} in {seconds:.2f} s", path=str(folder))
        if self.snapshots.due(self.step) and self.step < steps:
            try:
                self.snapshots.take()
            except WorkerFailure as failure:
                self.record(RecordKind.FAILURE, text=f"during snapshot: {failure}", dead=sorted(failure.dead))
                return failure
        return None

    # ---- run ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the initial workers (blocking: nothing is training yet); a group passed in may have some already."""
        if not self._owns_group:  # a pool's workers join idle, whatever they held before
            self.group.release(self.group.alive(), wait=True)
        missing = self.wishes.budget - len(self.group.alive())
        if missing > 0:
            self.group.spawn(missing)
        self.record(RecordKind.WORKERS, text=f"started workers {self.group.alive()}")
        text = redundancy_report(self.policy, self.cost, self.wishes.budget, self.snapshot_every,
                                 self.opt.require_replica)
        rounded = [f"{what} {asked} -> {used}" for what, asked, used in (
            ("snapshot_every", self.opt.snapshot_every, self.snapshot_every),
            ("checkpoint_every", self.opt.checkpoint_every, self.checkpoint_every)) if asked != used]
        if rounded:
            text += (f"; snapshots and checkpoints only at the {self.workload.name} workload's restart points "
                     f"(every {self.restart_every} steps): {', '.join(rounded)}")
        self.record(RecordKind.REDUNDANCY, text=text)

    def run(self) -> RunResult:
        self.start()
        return self.run_started()

    def run_started(self) -> RunResult:
        """Run to the end once ``start()`` has been called."""
        self._bar = progress_bar(self.cfg.train.steps, initial=self.step, disable=not self.opt.progress)
        try:
            with log_above_bar(self.opt.progress):
                while not isinstance(self.state, Done):
                    self.tick()
            self._bar.close()
            tensors = self.state.tensors
            placement = self.group.placement
            result = RunResult(self.history, self.reshards, self.recoveries, self.events, tensors,
                               time.perf_counter() - self._started, placement)
            if self.metrics is not None:
                self.metrics.summary({"steps": len(self.history), "seconds": result.seconds,
                                      "final_loss": self.history[-1].loss if self.history else None,
                                      "final_layout": str(placement.layout) if placement else None,
                                      "reshards": len(self.reshards), "recoveries": self.recoveries,
                                      "snapshots": self.snapshots.taken,
                                      "snapshot_stall_s": round(self.snapshots.stall_total, 3)})
            return result
        finally:
            self._bar.close()
            self._bar = None
            self.inbox.publish(self.status())

    def shutdown(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self._owns_group:
            self.group.shutdown()
        else:  # hand the workers back idle: no engine, no shards, no groups
            try:
                self.group.release(self.group.alive(), wait=True)
            except WorkerFailure as failure:
                log.warning("could not release every worker: %s", failure)
        self.inbox.close()
