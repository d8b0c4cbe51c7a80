"""A WorkerGroup whose "workers" live in this process: no Ray, no torch.distributed, no tensors.

It keeps what the controller can observe of real workers (who is alive or warming up, the placement,
the committed step, staged transfers, snapshots) and the bookkeeping a test checks afterwards: every
step each worker applied, and every call made. Faults are injected from the test, in the manner of
torchft's ``EventInjector().fail_at(rank, step)``: ``group.faults.kill_at(worker, step, phase)``.

Phases: "setup", "step" (computing), "apply" (after every rank computed the step), "transfer",
"commit", "snapshot", "restore", "gather" (the final tensors). A kill marks the worker dead and the
call raises ``WorkerFailure`` exactly as the Ray group does: survivors stay at the committed step,
or, for "apply", the failure carries the step's results (the step is committed).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elastic.core.config import Config
from elastic.core.data import GlobalSampler
from elastic.core.layout import Placement
from elastic.driver.group import Snapshot, WorkerFailure
from elastic.plan.memory_rounds import TransferWork
from elastic.runtime.engine import StepResult


@dataclass
class Fault:
    worker: int
    step: int | None  # None: the next time the phase runs
    phase: str
    action: str  # "kill", "fail" or "stall"
    seconds: float = 0.0
    why: str = ""  # a "fail"'s message (default: "<phase> failed (injected by the test)")


class Faults:
    """Faults a test schedules; each fires once."""

    def __init__(self) -> None:
        self.pending: list[Fault] = []
        self.fired: list[Fault] = []

    def kill_at(self, worker: int, step: int | None = None, phase: str = "step") -> Faults:
        self.pending.append(Fault(worker, step, phase, "kill"))
        return self

    def fail_at(self, worker: int, step: int | None = None, phase: str = "step", why: str = "") -> Faults:
        """The call raises on ``worker`` but its process lives (a bug, not a crash; or ``why`` says what)."""
        self.pending.append(Fault(worker, step, phase, "fail", why=why))
        return self

    def stall_at(self, worker: int, seconds: float, step: int | None = None, phase: str = "step") -> Faults:
        self.pending.append(Fault(worker, step, phase, "stall", seconds))
        return self

    def take(self, workers: Iterable[int], step: int, phase: str) -> list[Fault]:
        workers = set(workers)
        due = [f for f in self.pending if f.phase == phase and f.worker in workers and f.step in (None, step)]
        for f in due:
            self.pending.remove(f)
            self.fired.append(f)
        return due


@dataclass
class FakeWorker:
    id: int
    warm: bool = False
    dead: bool = False
    placement: Placement | None = None  # the placement its "engine" belongs to
    step: int = 0  # the step its engine is at
    pending: int | None = None  # a computed step awaiting the commit
    staged: tuple[Placement, int, list[int]] | None = None  # (placement, step, the shards' history)
    # The steps applied to the shards this worker holds, in order: its own, or those of the shards it received
    # in a reshard or a restore. A step in here twice means the run applied an update twice.
    applied: list[int] = field(default_factory=list)


class FakeWorkerGroup:
    def __init__(self, cfg: Config, warm_after_polls: int = 1) -> None:
        self.cfg = cfg
        self.workers: dict[int, FakeWorker] = {}
        self.faults = Faults()
        self.calls: list[tuple[str, Any]] = []
        self.warm_after_polls = warm_after_polls  # take_warmed() polls before a started worker is warm
        self.hold_warmup = False  # True: started workers stay warming until release_warmup()
        self._polls: dict[int, int] = {}
        self._placement: Placement | None = None
        self._committed = 0
        self._next_id = 0
        self.prepared_placements: list[Placement] = []  # what the controller asked to build ahead, in order
        self._build_asks: dict[Placement, int] = {}
        self.node_of: dict[int, str] = {}  # worker -> node, set by tests of failure domains
        self.node_bytes: dict[str, int] = {}  # node -> its memory, set by tests of memory budgets
        self.draining: dict[str, float | None] = {}  # node -> deadline: the cluster's drain notices, set by tests
        self.trouble: str | None = None  # what start_trouble() answers (a test sets it)
        self.fail_starts = False  # workers started from now on fail their warm-up
        self.prepare_polls = 0  # build_done() answers False this many times per placement first
        self.sampler = GlobalSampler(cfg.data.num_samples, cfg.train.global_batch, cfg.train.seed)

    # ---- what tests look at ----------------------------------------------------------------
    @property
    def placement(self) -> Placement | None:
        return self._placement

    @property
    def committed(self) -> int:
        return self._committed

    def release_warmup(self) -> None:
        self.hold_warmup = False
        for w in self.workers.values():
            if not w.dead:
                self._polls[w.id] = self.warm_after_polls

    def kill(self, worker: int) -> None:
        """The process dies now (as a SIGKILL between calls): the next call that involves it fails."""
        self.workers[worker].dead = True

    # ---- membership ----------------------------------------------------------------------
    def _new(self, n: int, warm: bool) -> list[int]:
        ids = list(range(self._next_id, self._next_id + n))
        self._next_id += n
        for wid in ids:
            self.workers[wid] = FakeWorker(wid, warm=warm)
            self._polls[wid] = 0
        return ids

    def spawn(self, n: int) -> list[int]:
        self.calls.append(("spawn", n))
        return self._new(n, warm=True)

    def start(self, n: int) -> list[int]:
        self.calls.append(("start", n))
        ids = self._new(n, warm=False)
        for wid in ids if self.fail_starts else ():  # their warm-up fails: they never join
            self.workers[wid].dead = True
        return ids

    def take_warmed(self) -> list[int]:
        done = []
        for w in self.workers.values():
            if w.warm or w.dead or self.hold_warmup:
                continue
            self._polls[w.id] += 1
            if self._polls[w.id] >= self.warm_after_polls:
                w.warm = True
                done.append(w.id)
        return done

    def wait_warm(self, timeout_s: float) -> None:
        if not self.hold_warmup:
            self.release_warmup()

    def start_trouble(self) -> str | None:
        return self.trouble

    def cancel_starting(self, count: int) -> list[int]:
        victims = sorted(self.starting, reverse=True)[:count]
        self.remove(victims)
        return victims

    @property
    def starting(self) -> list[int]:
        return sorted(w.id for w in self.workers.values() if not w.warm and not w.dead)

    def warm(self) -> list[int]:
        return sorted(w.id for w in self.workers.values() if w.warm and not w.dead)

    def live(self) -> frozenset[int]:
        return frozenset(w.id for w in self.workers.values() if not w.dead)

    def nodes(self) -> dict[int, str]:
        """One node per worker unless the test puts them on nodes (``node_of``)."""
        return {w.id: self.node_of.get(w.id, f"node-{w.id}") for w in self.workers.values() if w.warm and not w.dead}

    def remove(self, workers: Iterable[int]) -> None:
        for wid in list(workers):
            self.workers.pop(wid, None)

    def draining_nodes(self) -> dict[str, float | None]:
        """What the test announced: node -> deadline (``draining``)."""
        return dict(self.draining)

    def cluster_cpus(self) -> float:
        return 2.0

    @property
    def received_bytes(self) -> int:
        return 0  # the fake holds no tensors, so no call result carries any

    def node_memory(self) -> dict[str, int]:
        """{} unless the test gives nodes a size (``node_bytes``): no memory budget, as before issue 25."""
        return dict(self.node_bytes)

    def idle_bytes(self) -> dict[int, int]:
        return {}

    def shutdown(self) -> None:
        self.workers.clear()
        self._placement = None

    # ---- faults ----------------------------------------------------------------------------
    def _involve(self, workers: Iterable[int], phase: str, step: int) -> None:
        """Raise WorkerFailure if a member is dead or a fault fires for this phase."""
        workers = list(workers)
        dead = {w: "process died (killed by the test)" for w in workers if self.workers.get(w) is None
                or self.workers[w].dead}
        failed = {}
        for fault in self.faults.take(workers, step, phase):
            if fault.action == "stall":
                time.sleep(fault.seconds)
            elif fault.action == "kill":
                self.workers[fault.worker].dead = True
                dead[fault.worker] = f"process died during {phase} (killed by the test)"
            else:
                failed[fault.worker] = fault.why or f"{phase} failed (injected by the test)"
        if dead or failed:
            for w in dead:
                self.workers.pop(w, None)
            raise WorkerFailure(dead, failed)

    # ---- training ------------------------------------------------------------------------
    def setup(self, placement: Placement, step: int = 0, empty: bool = False) -> float:
        self.calls.append(("setup", placement))
        self._involve(placement.workers, "setup", step)
        for w in placement.workers:
            worker = self.workers[w]
            worker.placement, worker.step, worker.pending, worker.staged = placement, step, None, None
            worker.applied = list(range(step))  # built from the seed (step 0) or a checkpoint of ``step``
        self._placement, self._committed = placement, step
        return 0.0

    def step(self, tasks: Mapping[int, Any] | None = None) -> dict[int, StepResult]:
        placement, step = self._placement, self._committed
        self.calls.append(("step", step))
        for w in placement.workers:
            if w in self.workers:
                self.workers[w].step = self._settled(w)
        self._involve(placement.workers, "step", step)
        results = {}
        layout = placement.layout
        for rank, w in enumerate(placement.workers):
            worker = self.workers[w]
            assert worker.placement == placement and worker.step == step, (w, worker, step)
            worker.pending = step
            c = layout.coord(rank)
            first, last = c.pp == 0 and c.tp == 0, c.tp == 0 and c.pp == layout.pp - 1
            samples = self.sampler.slice_indices(step, layout.data_index(rank), layout.data_parallel) if first else []
            results[w] = StepResult(step=step, loss=1.0 / (step + 1) if last else None, grad_norm=1.0, lr=1e-3,
                                    tokens=16, samples=samples)
        self._committed += 1
        try:
            self._involve(placement.workers, "apply", step)
        except WorkerFailure as failure:
            failure.step_results = results
            raise
        for w in placement.workers:
            self.workers[w].step = self._settled(w)
        return results

    def _settled(self, w: int) -> int:
        """Apply a pending step the job committed (as Engine.sync does), and return the worker's step."""
        worker = self.workers[w]
        if worker.pending is not None:
            if worker.pending < self._committed:
                worker.applied.append(worker.pending)
                worker.step = worker.pending + 1
            worker.pending = None
        return worker.step

    def _history(self, workers: Iterable[int]) -> list[int]:
        """The applied steps of the shards the live ``workers`` hold; every live holder must agree."""
        histories = {tuple(self.workers[w].applied) for w in workers if w in self.workers and not self.workers[w].dead
                     and self.workers[w].staged is None}
        histories = histories or {tuple(self.workers[w].staged[2]) for w in workers if w in self.workers
                                  and self.workers[w].staged is not None}
        assert len(histories) == 1, f"workers {sorted(workers)} hold shards of different histories: {histories}"
        return list(histories.pop())

    def run(self, tasks: Mapping[int, Any]) -> dict[int, Any]:
        self.calls.append(("run", sorted(tasks)))
        self._involve(list(tasks), "run", self._committed)
        return {w: None for w in tasks}

    def settle(self, workers: Iterable[int]) -> None:
        for w in workers:
            if w in self.workers and not self.workers[w].dead:
                self.workers[w].step = self._settled(w)

    # ---- reshard -----------------------------------------------------------------------------
    def prepare(self, placements: Iterable[Placement]) -> None:
        self.prepared_placements.extend(placements)

    def build_done(self, placement: Placement) -> bool:
        """Built after ``prepare_polls`` asks for this placement (0: at once), as a background build would be."""
        self._build_asks[placement] = self._build_asks.get(placement, 0) + 1
        return self._build_asks[placement] > self.prepare_polls

    def transfer(self, new: Placement, work: TransferWork, step: int) -> dict[int, dict]:
        self.calls.append(("transfer", new))
        participants = sorted(set(new.workers) | set(work.movers))
        sources = {t.src for items in work.per_worker.values() for _, _, t in items}
        self._involve(sorted(set(participants) | sources), "transfer", step)
        history = self._history(self._placement.workers)
        for w in new.workers:
            self.workers[w].staged = (new, step, history)
        return {w: {"peak_buffer_bytes": 0} for w in participants}

    def cancel_transfer(self, workers: Iterable[int]) -> None:
        for w in workers:
            if w in self.workers:
                self.workers[w].staged = None

    def commit(self, new: Placement) -> dict[int, dict]:
        self.calls.append(("commit", new))
        self._placement = new
        self._involve(new.workers, "commit", self._committed)
        for w in new.workers:
            worker = self.workers[w]
            assert worker.staged is not None and worker.staged[0] == new, f"worker {w} has nothing staged for {new}"
            worker.placement, worker.step, worker.pending = new, worker.staged[1], None
            worker.applied = list(worker.staged[2])
            worker.staged = None
        return {w: {"leave": 0.0, "group": 0.0, "engine": 0.0, "total": 0.0} for w in new.workers}

    def release(self, workers: Iterable[int], wait: bool = True) -> None:
        workers = list(workers)
        if self._placement is not None and set(self._placement.workers) <= set(workers):
            self._placement, self._committed = None, 0
        for w in workers:
            if w in self.workers:
                self.workers[w].placement = self.workers[w].staged = None

    # ---- snapshots, checkpoints, inspection -----------------------------------------------------
    def snapshot(self) -> Snapshot:
        placement = self._placement
        self.calls.append(("snapshot", self._committed))
        self._involve(placement.workers, "snapshot", self._committed)
        history = self._history(placement.workers)
        return Snapshot(self._committed, placement, {w: list(history) for w in placement.workers}, 0, 0.0)

    def snapshot_status(self, snap: Snapshot, wait_s: float = 0.0) -> bool | None:
        return True

    def restore(self, snap: Snapshot, new: Placement) -> None:
        self.calls.append(("restore", snap.step, new))
        self._involve(new.workers, "restore", snap.step)
        history = next(iter(snap.parts.values()))
        for w in new.workers:
            worker = self.workers[w]
            worker.placement, worker.step, worker.pending, worker.staged = new, snap.step, None, None
            worker.applied = list(history)
        self._placement, self._committed = new, snap.step

    def write_shards(self, folder: Path, entries: dict[int, list]) -> dict[int, dict]:
        raise NotImplementedError("the fake group holds no tensors; checkpoints are tested on real workers")

    def load_checkpoint(self, folder: Path, placement: Placement, step: int) -> None:
        raise NotImplementedError("the fake group holds no tensors; checkpoints are tested on real workers")

    def gather_tensors(self) -> tuple[int, dict]:
        self.calls.append(("gather", self._committed))
        self._involve(self._placement.workers, "gather", self._committed)
        return self._committed, {"applied": self._history(self._placement.workers)}
