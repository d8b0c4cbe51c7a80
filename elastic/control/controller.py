"""The controller: an explicit state machine that trains, watches events and moves the job live.

The states, their payloads and the allowed transitions are in ``states.py`` (with the diagram); what
each state does is in ``handlers.py``. ``tick()`` runs the current state's handler once; the handler
returns the next state, and only the handlers choose it. ``_set_state`` checks the transition against
the table, records it in the journal (``events.jsonl``), calls the listeners and publishes the job's
status. This class wires the collaborators, keeps the run's bookkeeping and runs the loop.

Events are acted on only between steps. The policy answers with a typed decision (``Stay``, ``Move``,
``Pause``, ``Refuse``). Every move, planned or recovering, goes through Resharding and one executor
(``moves.Mover``), which calibrates the cost model. A move whose skeleton is still being built waits in
Preparing, where training goes on, with the operator requests it will answer. New workers start and warm
up in the background while training goes on; training stalls only for the state transfer itself.

Collaborators: the worker group (``driver/group.py``; it owns the committed step), the policy and cost
model (``plan/``), the inbox (events in, answers out), the wishes (budget, drains, phase, pause),
recovery, safekeeping (snapshots and checkpoints) and the journal. The controller talks to workers only
through the ``WorkerGroup`` protocol, so the controller tests run it on a fake group in one process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from elastic.control.config import ControlConfig
from elastic.control.evaluation import Evaluation
from elastic.control.events import Event
from elastic.control.handlers import HANDLERS
from elastic.control.inbox import Inbox, PlaneLink
from elastic.control.journal import Journal
from elastic.control.moves import Mover
from elastic.control.recovery import Recovery
from elastic.control.result import RunResult, run_summary
from elastic.control.safekeeping import Safekeeping, checkpoint_root, redundancy_report, resume_folder
from elastic.control.sources import ClusterWatcher, DrainWatcher
from elastic.control.states import (
    Done,
    Planning,
    Transition,
    name,
)
from elastic.control.steps import StepLog
from elastic.control.wishes import Wishes
from elastic.control.workload import LMWorkload, Workload
from elastic.core.config import Config
from elastic.core.data import check_data
from elastic.core.records import RecordKind
from elastic.driver.group import WorkerFailure, WorkerGroup
from elastic.driver.resharder import ReshardReport
from elastic.driver.summary import StepSummary
from elastic.model.specs import itemsize
from elastic.plan.costmodel import CostModel
from elastic.plan.domains import survives_one_loss
from elastic.plan.memory import MemoryModel
from elastic.plan.policy import Policy
from elastic.tools.metrics import MetricsWriter
from elastic.tools.progress import log_above_bar

log = logging.getLogger(__name__)


class Controller:
    def __init__(self, cfg: Config, group: WorkerGroup | None = None, workload: Workload | None = None,
                 policy: Policy | None = None, plane: PlaneLink | None = None, *, sources: Iterable = (),
                 job_name: str | None = None, run_dir: str | None = None, progress: bool = True,
                 gather_tensors: bool = True, export_dir: str | None = None) -> None:
        """``cfg`` holds everything configurable (its ``[control]`` section: ``ControlConfig``). The rest is how
        this run is wired: ``sources`` (extra event sources with ``poll(step)``), ``job_name`` (registers the
        named control-plane actor), ``run_dir`` (metrics.jsonl, events.jsonl, summary.json), ``progress`` (the
        bar), ``gather_tensors`` (assemble the final full tensors on the driver) and ``export_dir`` (the workers
        write the model there at the end, ``driver/exporter.py``; the CLI's run folder)."""
        self.cfg, self.control = cfg, ControlConfig.of(cfg)
        if cfg.runtime.workers > self.control.max_workers:
            raise ValueError(f"runtime.workers={cfg.runtime.workers} exceeds control.max_workers="
                             f"{self.control.max_workers}; start fewer workers or raise the cap")
        self.progress, self.gather_tensors, self.export_dir = progress, gather_tensors, export_dir
        self._started = time.perf_counter()
        check_data(cfg)  # a bad data file, column or tokenizer fails here, before any worker starts
        self.workload = workload or LMWorkload()
        if cfg.train.eval_every and not hasattr(self.workload, "evaluate"):
            raise ValueError(f"train.eval_every={cfg.train.eval_every}: the {self.workload.name} workload has no "
                             "evaluation yet; set train.eval_every=0")
        # Steps between the workload's restart points; snapshots and checkpoints are taken only there.
        restart_every = max(1, int(getattr(self.workload, "restart_every", 1)))
        self.checkpoint_root = checkpoint_root(self.control, run_dir)
        self.resume_from = resume_folder(cfg, self.control, self.checkpoint_root, restart_every, self.workload.name)
        self._owns_group = group is None  # a group passed in (a pool of warm workers) outlives this controller
        if group is None:
            from elastic.driver.ray_group import RayWorkerGroup

            group = RayWorkerGroup(cfg)
        group.cfg = cfg
        self.group = group
        self.cost = CostModel(cfg.model, cfg.train.global_batch, cfg.data.seq_len, itemsize(cfg),
                              cores=group.cluster_cpus())
        self.policy = policy or Policy(cfg, self.cost, self.control.objective, self.control.min_workers,
                                       require_replica=self.control.require_replica, memory=MemoryModel(cfg))
        self.policy.phase_filter.update(self.workload.phase_filters())
        self.safe = Safekeeping(group, self.control, restart_every, self.checkpoint_root, job_name or "run")
        self.recovery = Recovery(group, self.policy, self.safe.snapshots, self.checkpoint_root, self.resume_from)
        self.wishes = Wishes(cfg.runtime.workers, self.control.max_workers, self.control.pinned())
        self.inbox = self._inbox(list(sources), plane, job_name)
        self.metrics = MetricsWriter(run_dir, append=self.resume_from is not None) if run_dir else None
        self.journal = Journal(self.metrics, self._started)
        self.state = Planning()
        self.mover = Mover(cfg, group, self.cost, self.recovery, self.wishes,
                           lambda kind, **details: self.record(kind, **details))
        self.steps = StepLog(self.cost, self.metrics, self.policy.memory)
        self.evaluation = Evaluation(cfg.train.eval_every, self.metrics, self.record)
        self.listeners: list[Callable[[Transition], None]] = []  # called after every transition
        self.step_failures: dict[int, list[int]] = {}  # committed step -> the culprit of each failure there
        self._cover: tuple = (None, False)  # (placement, whether it survives any one loss without a snapshot)
        self._snapshot_every: int | None = None

    def _inbox(self, sources: list, plane: PlaneLink | None, job_name: str | None) -> Inbox:
        """Where events come from: the caller's sources, Ray's cluster view and drain notices (as configured), and
        the operator's control plane (the named actor of ``job_name``)."""
        control = self.control
        if control.watch_cluster:
            sources.append(ClusterWatcher(self.cfg.runtime.cpus_per_worker, control.max_workers,
                                          control.poll_interval_s))
        if control.watch_drains:
            sources.append(DrainWatcher(self.group, control.poll_interval_s))
        if plane is None and job_name:
            from elastic.control.control_plane import RayPlaneLink

            plane = RayPlaneLink(job_name)
        return Inbox(sources, plane, control.poll_interval_s)

    # ---- bookkeeping --------------------------------------------------------------------
    @property
    def step(self) -> int:
        """The job's committed optimizer steps: the group's count, the only one."""
        return self.group.committed

    @property
    def history(self) -> list[StepSummary]:
        return self.steps.history

    @property
    def reshards(self) -> list[ReshardReport]:
        return self.mover.reshards

    @property
    def recoveries(self) -> list[dict]:
        return self.mover.recoveries

    @property
    def events(self) -> list[dict]:
        return self.journal.entries

    @property
    def phase(self) -> str:
        return self.wishes.phase

    @property
    def remaining(self) -> int:
        return self.cfg.train.steps - self.step

    def record(self, kind: RecordKind, level: int = logging.INFO, **details) -> dict:
        return self.journal.record(kind, self.step, level, **details)

    def failed(self, failure: WorkerFailure, during: str = "") -> None:
        """Journal a loss (``during``: what was going on, for the text)."""
        self.record(RecordKind.FAILURE, text=f"{during}: {failure}" if during else str(failure),
                    dead=sorted(failure.dead))

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

    def snapshot_interval(self) -> int:
        """Steps between in-memory snapshots for the current placement (0: none; see ``safekeeping.py``); a change
        is journalled."""
        placement = self.group.placement
        if placement != self._cover[0]:
            self._cover = (placement, survives_one_loss(placement, self.group.nodes(), self.policy.specs,
                                                        self.cfg.model.n_layers))
        recent = sorted(h.seconds for h in self.history[-5:])
        step = recent[len(recent) // 2] if recent else self.cost.step_seconds(placement.layout)
        state = sum(s.numel for s in self.policy.specs) * self.cost.itemsize // placement.layout.world
        every = self.safe.snapshot_interval(self._cover[1], step, state)
        if every != self._snapshot_every:
            self._snapshot_every = every
            self.record(RecordKind.REDUNDANCY, text=f"snapshots every {every} steps on {placement.layout}" if every
                        else f"no snapshots on {placement.layout}: every shard has a replica a loss leaves alive")
        return every

    def usable(self) -> list[int]:
        return self.wishes.usable(self.group.warm())

    # ---- the state machine ----------------------------------------------------------------
    def tick(self) -> Transition:
        """Run the current state's handler once and move to the state it chose."""
        transition = Transition(self.state, HANDLERS[type(self.state)](self, self.state)).check()
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

    # ---- run ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the initial workers (blocking: nothing is training yet); a group passed in may have some already."""
        if not self._owns_group:  # a pool's workers join idle, whatever they held before
            self.group.release(self.group.warm(), wait=True)
        missing = self.wishes.budget - len(self.group.warm())
        if missing > 0:
            self.group.spawn(missing)
        warm = self.group.warm()
        pids = f" (pids {[self.group.pid(w) for w in warm]})" if hasattr(self.group, "pid") else ""
        self.record(RecordKind.WORKERS, text=f"started workers {warm}{pids}", workers=warm)
        text = redundancy_report(self.policy, self.cost, self.wishes.budget, self.control, self.checkpoint_root,
                                 self.control.require_replica)
        self.record(RecordKind.REDUNDANCY, text=text + self.safe.rounding_note(self.workload.name))

    def run(self) -> RunResult:
        self.start()
        return self.run_started()

    def run_started(self) -> RunResult:
        """Run to the end once ``start()`` has been called."""
        self.steps.open_bar(self.cfg.train.steps, self.step, self.progress)
        try:
            with log_above_bar(self.progress):
                while not isinstance(self.state, Done):
                    self.tick()
            self.steps.close_bar()
            result = RunResult(self.history, self.reshards, self.recoveries, self.events, self.state.tensors,
                               time.perf_counter() - self._started, self.group.placement, self.state.export,
                               self.steps.tries)
            if self.metrics is not None:
                self.metrics.summary(run_summary(result, self.safe.snapshots, self.step >= self.cfg.train.steps,
                                                 self.policy.memory))
            return result
        finally:
            self.steps.close_bar()
            self.inbox.publish(self.status(), force=True)

    def shutdown(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self._owns_group:
            self.group.shutdown()
        else:  # hand the workers back idle: no engine, no shards, no groups
            try:
                self.group.release(self.group.warm(), wait=True)
            except WorkerFailure as failure:
                log.warning("could not release every worker: %s", failure)
        self.inbox.close()
