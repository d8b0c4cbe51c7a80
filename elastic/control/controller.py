"""The controller: an explicit state machine that trains, watches events and reshards live.

    RUNNING --event--> PLANNING --move--> RESHARDING --done--> RUNNING
       |                  |  \\--stay--> RUNNING          \\--failed, old intact--> RUNNING
       |                  \\--no valid layout--> PAUSED --resources back--> PLANNING
       \\--worker lost--> RECOVERING --> RUNNING            RUNNING --all steps done--> DONE

``tick()`` applies exactly one transition. Events are only acted on between steps. New workers
are started and warmed in the background while training continues; training stalls only for
the state transfer itself. Every decision is logged with its reason and the cost model's figures.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch

from elastic.control.control_plane import NAMESPACE, ControlPlane, actor_name
from elastic.control.events import (
    ClusterWatcher,
    Event,
)
from elastic.control.inbox import EventsMixin
from elastic.control.recovery import RecoveryMixin, Snapshotter
from elastic.control.states import State
from elastic.control.workload import LMWorkload
from elastic.core import checkpoint as ckpt
from elastic.core.config import Config
from elastic.core.layout import Layout, Placement
from elastic.driver.checkpoints import resume_checkpoint
from elastic.driver.ray_group import WorkerFailure, WorkerGroup
from elastic.driver.resharder import ReshardFailed, ReshardReport, reshard
from elastic.driver.summary import StepSummary, describe, progress_bar, summarize
from elastic.model.specs import state_specs
from elastic.plan.costmodel import CostModel
from elastic.plan.policy import Decision, Policy
from elastic.runtime.engine import DTYPE
from elastic.tools.metrics import MetricsWriter

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    history: list[StepSummary]
    reshards: list[ReshardReport]
    events: list[dict]
    state: dict[str, torch.Tensor] | None
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
    gather_state: bool = True  # assemble the final full state on the driver
    background_start: bool = True  # warm new workers while training goes on (False: wait; for scripted tests)
    snapshot_every: int = 0  # in-memory snapshot every k steps (0: none; then only replicas protect state)
    require_replica: bool = False  # only layouts with dp >= 2, so any single loss recovers without replay
    checkpoint_dir: str | None = None  # where on-disk checkpoints go (only for restarting a whole job)
    checkpoint_every: int = 0  # write a checkpoint every k steps (0: never)
    resume: str | None = None  # a checkpoint folder, or a checkpoint_dir to resume its latest
    run_dir: str | None = None  # metrics.jsonl / events.jsonl / summary.json go here (see elastic.tools.metrics)
    phase_layouts: dict = field(default_factory=dict)  # phase -> Layout the operator wants for that phase
    sources: list = field(default_factory=list)  # extra event sources with poll(step) -> [Event]


class Controller(EventsMixin, RecoveryMixin):
    def __init__(self, cfg: Config, options: ControllerOptions | None = None, group: WorkerGroup | None = None,
                 workload=None):
        self.cfg, self.opt = cfg, options or ControllerOptions()
        self.workload = workload or LMWorkload()
        self.group = group or WorkerGroup(cfg)
        itemsize = torch.empty((), dtype=DTYPE[cfg.train.dtype]).element_size()
        cores = ray.cluster_resources().get("CPU", 2.0) if ray.is_initialized() else 2.0
        self.cost = CostModel(cfg.model, cfg.train.global_batch, cfg.data.seq_len, itemsize, cores=cores)
        self.policy = Policy(cfg, self.cost, self.opt.objective, self.opt.min_workers,
                             require_replica=self.opt.require_replica)
        self.snapshots = Snapshotter(self.group, self.opt.snapshot_every)
        if hasattr(self.workload, "phase_filters"):
            self.policy.phase_filter.update(self.workload.phase_filters())
        self.failure: Exception | None = None
        self.state = State.PLANNING
        self.step = 0
        self.budget = cfg.runtime.workers
        self.phase = "train"
        self.paused_by_operator = False
        self.stopping = False
        self.pending: list[Event] = []
        self.draining: set[int] = set()
        self.forced: Layout | None = self.opt.layout
        self.target: Decision | None = None
        self.history: list[StepSummary] = []
        self.reshards: list[ReshardReport] = []
        self.recoveries: list[dict] = []
        self.events: list[dict] = []
        self.sources = list(self.opt.sources)
        if self.opt.watch_cluster:
            self.sources.append(ClusterWatcher(cfg.runtime.cpus_per_worker, self.opt.max_workers,
                                               self.opt.poll_interval_s))
        self.plane = None
        if self.opt.job_name:
            self.plane = ControlPlane.options(name=actor_name(self.opt.job_name), namespace=NAMESPACE).remote()
        self._next_poll = 0.0
        self._fresh = True
        self._resume_folder = None
        if self.opt.resume:  # validate the whole checkpoint before any worker starts
            path = Path(self.opt.resume)
            folder = path if (path / "manifest.json").is_file() else ckpt.latest(path)
            ckpt.open_checkpoint(folder, cfg, state_specs(cfg), verify=True)
            self._resume_folder = folder
        self._awaiting: list[Event] = []
        self._bar = None
        self._started = time.perf_counter()
        self.metrics = MetricsWriter(self.opt.run_dir, append=bool(self.opt.resume)) if self.opt.run_dir else None

    # ---- bookkeeping --------------------------------------------------------------------
    def record(self, kind: str, **details) -> None:
        entry = {"kind": kind, "step": self.step, "time": time.perf_counter() - self._started, **details}
        self.events.append(entry)
        if self.metrics is not None:
            self.metrics.event(entry)
        text = details.get("text") or ", ".join(f"{k}={v}" for k, v in details.items())
        log.info("[step %d] %s: %s", self.step, kind, text)
        if self._bar is not None:
            self._bar.write(f"[step {self.step}] {kind}: {text}")

    def status(self) -> dict:
        placement = self.group.placement
        last = self.reshards[-1] if self.reshards else None
        return {"state": self.state.value, "step": self.step, "steps": self.cfg.train.steps,
                "layout": str(placement.layout) if placement else None,
                "workers": list(placement.workers) if placement else [],
                "starting": self.group.starting, "budget": self.budget, "phase": self.phase,
                "loss": self.history[-1].loss if self.history else None,
                "last_reshard": None if last is None else {
                    "from": last.old, "to": last.new, "reason": last.reason, "step": last.step,
                    "seconds": round(last.total_seconds, 3), "bytes": last.bytes_moved}}

    # ---- the state machine --------------------------------------------------------------
    def tick(self) -> None:
        {State.RUNNING: self._running, State.PLANNING: self._planning, State.RESHARDING: self._resharding,
         State.PAUSED: self._paused, State.RECOVERING: self._recovering}[self.state]()
        self._publish()

    def _running(self) -> None:
        ready = self.group.ready()
        if ready:
            self.record("workers ready", text=f"workers {ready} warmed up", workers=ready)
        events = self.pending + self._poll()
        self.pending = []
        if events or ready:
            self.pending = events
            self.state = State.PLANNING
            return
        if self.step >= self.cfg.train.steps:
            self.state = State.DONE
            return
        placement = self.group.placement
        started = time.perf_counter()
        try:
            results = self.workload.step(self)
        except WorkerFailure as failure:
            self.record("failure", text=str(failure), dead=sorted(failure.dead))
            self.failure = failure
            self.state = State.RECOVERING
            return
        if results is None:  # the workload did other work (a rollout) or asked for a phase change
            return
        summary = summarize(results, placement, time.perf_counter() - started)
        self.history = [h for h in self.history if h.step < summary.step]  # a replayed step replaces its first try
        self.history.append(summary)
        if self.metrics is not None:
            self.metrics.step(summary)
        if not self._fresh:  # a placement's first step pays one-off costs; do not calibrate on it
            self.cost.observe_step(placement.layout, summary.seconds)
        self._fresh = False
        self.step += 1
        if self._bar is not None:
            self._bar.set_postfix(describe(summary), refresh=False)
            self._bar.n = self.step
            self._bar.refresh()
        every = self.opt.checkpoint_every
        if self.opt.checkpoint_dir and every and (self.step % every == 0 or self.step == self.cfg.train.steps):
            self._checkpoint()
        if self.snapshots.due(self.step) and self.step < self.cfg.train.steps:
            try:
                self.snapshots.take()
            except WorkerFailure as failure:
                self.record("failure", text=f"during snapshot: {failure}", dead=sorted(failure.dead))
                self.failure = failure
                self.state = State.RECOVERING

    def _planning(self) -> None:
        events, self.pending = self.pending, []
        must, reason = self._apply(events)
        current = self.group.placement
        if self.stopping:
            self._answer(events, f"stopping at step {self.step}")
            self.record("stop", text=f"stopping at step {self.step} on request")
            self.state = State.DONE
            return
        if current is not None and any(w not in self.group.actors for w in current.workers):
            must, reason = True, reason or "workers lost"
        if self.paused_by_operator:
            self._answer(events, "paused")
            self.state = State.PAUSED
            return
        decision = self._decide(events, must, reason)
        if decision is None:
            return
        wanted = decision.placement.workers
        missing = [w for w in wanted if w < 0]
        if missing and not self.opt.background_start:
            started = self.group.spawn(len(missing))
            self.record("scale-out", text=f"started workers {started} for {decision.describe()}")
            decision = self._decide(events, must, reason)
            if decision is None:
                return
            wanted, missing = decision.placement.workers, []
        waiting = [w for w in wanted if w in self.group.starting]
        if missing:
            started = self.group.start(len(missing))
            self.record("scale-out", text=f"starting workers {started} in the background for {decision.describe()}")
        if missing or waiting:
            self._answer(events, f"starting workers for {decision.describe()}")
            self.state = State.RUNNING if current else State.PAUSED
            return
        self._awaiting = events  # answered once the reshard is done, with what happened
        self.record("decision", text=decision.describe(), layout=str(decision.placement.layout),
                    workers=list(wanted))
        self.target = decision
        self.state = State.RESHARDING

    def _decide(self, events: list[Event], must: bool, reason: str) -> Decision | None:
        """Ask the policy; on 'stay', 'pause' or a refused request set the next state and return None."""
        current = self.group.placement
        # Offer the policy a budget's worth of workers: the current ones first, then spares, then
        # workers still warming up, then placeholders (negative ids) for workers not started yet.
        usable = sorted(self._usable(), key=lambda w: (current is None or current.rank_of(w) is None, w))
        pool = usable + self.group.starting
        candidates = (pool + [-(i + 1) for i in range(max(0, self.budget - len(pool)))])[: self.budget]
        try:
            decision = self.policy.decide(current, candidates, self.cfg.train.steps - self.step, self.forced,
                                          must, reason, self.phase, alive=frozenset(self.group.actors))
        except ValueError as err:
            decision = err
        self.forced = None
        if isinstance(decision, ValueError):
            self._answer(events, f"refused: {decision}")
            self.record("refused", text=str(decision))
            self.state = State.RUNNING if current else State.PAUSED
            return None
        if decision is None:
            self._answer(events, f"keep {current.layout} on {len(current.workers)} workers (no predicted gain)")
            self.record("keep", text=f"stay on {current.layout}: no layout is predicted to pay off")
            self.state = State.RUNNING
            return None
        if decision.placement is None:
            self._answer(events, decision.describe())
            self.record("pause", text=decision.describe())
            self.state = State.PAUSED
            return None
        return decision

    def _resharding(self) -> None:
        decision, self.target = self.target, None
        current = self.group.placement
        if current is None and self.opt.resume:  # the first placement, from a checkpoint on disk
            self.step = resume_checkpoint(self.group, self._resume_folder, decision.placement, verify=False)
            self.record("resume", text=f"{decision.placement.layout} on workers {list(decision.placement.workers)} "
                                       f"from {self.opt.resume} at step {self.step}")
        elif current is None:  # the first placement: build from the seed
            seconds = self.group.setup(decision.placement, step=self.step)
            self.record("start", text=f"{decision.placement.layout} on workers {list(decision.placement.workers)} "
                                      f"in {seconds:.2f} s")
        else:
            try:
                report = reshard(self.group, decision.placement, self.step, decision.reason)
            except ReshardFailed as err:
                self._answer(self._awaiting, f"reshard to {decision.placement.layout} failed: {err}")
                self.record("reshard failed", text=str(err))
                self.state = State.RUNNING if err.old_intact else State.RECOVERING
                if not err.old_intact:
                    self.failure = err.failure
                return
            except WorkerFailure as failure:  # a worker died while committing the new placement
                self.record("reshard failed", text=f"during commit: {failure}")
                self.failure = failure
                self.state = State.RECOVERING
                return
            self.reshards.append(report)
            self.cost.observe_reshard(report.max_worker_bytes, report.transfer_seconds,
                                      report.plan_seconds + report.commit_seconds)
            self.record("reshard", text=report.line(), seconds=report.total_seconds, bytes=report.bytes_moved,
                        old=report.old, new=report.new, reason=report.reason)
            self._answer(self._awaiting, f"moved to {decision.describe()}; {report.line()}")
        idle = [w for w in self.group.alive() if w not in decision.placement.workers]
        surplus = idle[: max(0, len(self.group.alive()) - self.budget)]
        leaving = sorted(set(w for w in idle if w in self.draining) | set(surplus))
        self._fresh = True
        if leaving:
            self.group.remove(leaving)
            self.draining -= set(leaving)
            self.record("drained", text=f"workers {leaving} left after their state moved", workers=leaving)
        self.state = State.RUNNING

    def _paused(self) -> None:
        events = self.pending + self._poll(force=True)
        self.pending = []
        ready = self.group.ready()
        if events or ready:
            self.pending = events
            self.state = State.PLANNING
            return
        time.sleep(self.opt.poll_interval_s)

    # ---- run ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the initial workers (blocking: nothing is training yet) and form the first placement."""
        self.group.spawn(self.budget)
        self.record("workers", text=f"started workers {self.group.alive()}")
        self.record("redundancy", text=self.redundancy_report())

    def run(self) -> RunResult:
        self.start()
        return self.run_started()

    def run_started(self) -> RunResult:
        """Run to the end once ``start()`` has been called."""
        self._bar = progress_bar(self.cfg.train.steps, disable=not self.opt.progress)
        try:
            while self.state != State.DONE:
                self.tick()
            self._bar.close()
            state = None
            if self.opt.gather_state:
                state = self.group.gather_full_state(state_specs(self.cfg))[1]
            result = RunResult(self.history, self.reshards, self.events, state,
                               time.perf_counter() - self._started, self.group.placement)
            if self.metrics is not None:
                placement = self.group.placement
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
            self._publish()

    def shutdown(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self.group.shutdown()
        if self.plane is not None:
            ray.kill(self.plane)
            self.plane = None
