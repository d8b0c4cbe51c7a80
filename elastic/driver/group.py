"""The driver/worker boundary: what the controller may ask of its workers, and how they fail.

``WorkerGroup`` is the protocol. ``RayWorkerGroup`` (``ray_group.py``) implements it with one Ray
actor per worker; the controller tests' ``FakeWorkerGroup`` (``tests/controller/fake_group.py``)
implements it in one process, with faults injected from test code. Nothing else touches actor
handles: every call the controller, the resharder and recovery make goes through these methods.

The group owns the job's ``placement`` (who holds which ranks) and ``committed`` (optimizer steps
every rank has computed: the job's one step counter). Only the group's own methods change them:
``setup`` and ``load_checkpoint`` set both, ``step`` advances ``committed``, ``commit`` and ``restore``
move ``placement`` (``restore`` also rolls ``committed`` back to the snapshot's step), and ``release``
of every worker of the placement ends it.

A failing call raises ``WorkerFailure`` naming the workers that died or failed; before it does, the
group releases every other member blocked in a collective, so nobody waits out a timeout.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from elastic.core.config import Config
from elastic.core.layout import Placement
from elastic.plan.memory_rounds import TransferWork
from elastic.runtime.engine import StepResult
from elastic.runtime.tasks import WorkerTask


class WorkerFailure(RuntimeError):
    """Some workers died or failed. ``dead`` lists the processes that are gone, ``failed`` the ones whose
    call raised; ``details`` holds each worker's traceback (for ``--debug``). ``first``: the worker whose
    failure came first (the others' may be its consequence: the driver cut their connections).

    ``step_results`` is set when every rank had computed a step before a worker died while applying
    it: that step is committed (the survivors apply it), so the caller must count it as done.
    """

    def __init__(self, dead: dict[int, str], failed: dict[int, str], details: dict[int, str] | None = None,
                 step_results: dict[int, StepResult] | None = None, first: int | None = None) -> None:
        self.dead, self.failed, self.details = dead, failed, details or {}
        self.step_results = step_results
        self.first = first if first is not None else min(dead or failed, default=None)
        culprits = dead or failed
        detail = "; ".join(f"worker {w}: {why}" for w, why in sorted(culprits.items()))
        super().__init__(f"{'lost' if dead else 'failed'} worker(s) {sorted(culprits)}: {detail}")

    def traceback_text(self) -> str:
        """Every worker's remote traceback, one after another."""
        return "\n".join(f"--- worker {w} ---\n{text}" for w, text in sorted(self.details.items()))


@dataclass
class Snapshot:
    """Every rank's copy of its shards at ``step``; ``parts`` are the group's handles to them."""

    step: int
    placement: Placement
    parts: dict[int, Any]
    nbytes: int
    stall_seconds: float
    travel: Any = None  # the group's own handle on the copies' way off their workers' nodes, if it keeps one


class WorkerGroup(Protocol):
    """What the controller asks of its workers (see the module docstring)."""

    cfg: Config

    # ---- membership ----------------------------------------------------------------------
    @property
    def placement(self) -> Placement | None: ...
    @property
    def committed(self) -> int:
        """The job's committed optimizer steps (the one step counter; the controller reads it)."""
    @property
    def starting(self) -> list[int]:
        """Workers started in the background that are still warming up."""
    def warm(self) -> list[int]:
        """Workers that are up and warm."""
    def live(self) -> frozenset[int]:
        """Every worker process still alive, warm or warming."""
    def nodes(self) -> dict[int, str]:
        """worker -> the node it runs on (warm workers): the unit that fails together."""
    def node_memory(self) -> dict[str, int]:
        """node -> bytes of memory the cluster says it has for the workers ({}: not known, memory limits nothing)."""
    def idle_bytes(self) -> dict[int, int]:
        """worker -> its resident bytes when idle (warm, no model), where it reported them."""
    def draining_nodes(self) -> dict[str, float | None]:
        """Nodes the cluster announced it will take away: node -> deadline (seconds since the epoch) or None."""
    def spawn(self, n: int) -> list[int]:
        """Start ``n`` workers and wait until they are warm."""
    def start(self, n: int) -> list[int]:
        """Start ``n`` workers in the background (they warm up while training goes on)."""
    def take_warmed(self) -> list[int]:
        """Background workers that finished warming up since the last call (non-blocking; they count as warm
        from then on)."""
    def wait_warm(self, timeout_s: float) -> None:
        """Block until no worker is warming up (or the timeout passes)."""
    def cancel_starting(self, count: int) -> list[int]: ...
    def start_trouble(self) -> str | None:
        """One line saying why workers cannot be started, once their failed warm-ups used up every retry."""
    def remove(self, workers: Iterable[int]) -> None: ...
    def cluster_cpus(self) -> float:
        """CPUs the workers share (for the cost model)."""
    def shutdown(self) -> None: ...

    # ---- training ------------------------------------------------------------------------
    def setup(self, placement: Placement, step: int = 0, empty: bool = False) -> float:
        """Form ``placement`` and build every rank's engine from the seed (``empty``: unfilled, for a load that
        follows); returns the slowest rank's seconds."""
    def step(self, tasks: Mapping[int, WorkerTask] | None = None) -> dict[int, StepResult]:
        """One committed optimizer step on every rank (``tasks``: per-worker step tasks, default ``TrainStep``)."""
    def run(self, tasks: Mapping[int, WorkerTask]) -> dict[int, Any]:
        """Run a task that is not an optimizer step (a rollout, a read, a probe) on the given workers."""
    def settle(self, workers: Iterable[int]) -> None:
        """Bring ``workers`` to the committed step (apply or drop a pending update): after a failure."""

    # ---- skeletons built ahead --------------------------------------------------------------
    def prepare(self, placements: Iterable[Placement]) -> None:
        """Build these placements' engine skeletons and groups in the background (returns at once)."""
    def build_done(self, placement: Placement) -> bool:
        """Whether no background build of ``placement`` is queued or running (it also sends the next build)."""

    # ---- live reshard: transfer, then commit ----------------------------------------------
    def transfer(self, new: Placement, work: TransferWork, step: int) -> dict[int, dict]:
        """Phase 1: build ``new``'s shards from the current ones (the current engines stay intact)."""
    def cancel_transfer(self, workers: Iterable[int]) -> None: ...
    def commit(self, new: Placement) -> dict[int, dict]:
        """Phase 2: ``new`` becomes the placement and every rank builds its engine from its transferred shards."""
    def release(self, workers: Iterable[int], wait: bool = True) -> None:
        """Workers leaving the placement drop their engines and shards (they stay alive as spares);
        ``wait=False`` returns at once (after a recovery, spares drop their shards meanwhile). Releasing every
        worker of the placement ends it: ``placement`` becomes None and ``committed`` 0."""

    # ---- snapshots, checkpoints, inspection -------------------------------------------------
    def snapshot(self) -> Snapshot: ...
    def snapshot_status(self, snap: Snapshot, wait_s: float = 0.0) -> bool | None:
        """True once every part has arrived, False while some are in flight, None if a part was lost."""
    def restore(self, snap: Snapshot, new: Placement) -> None:
        """Rebuild every rank of ``new`` from ``snap``; the job rolls back to ``snap.step``."""
    def checkpoint_copy(self, entries: dict[int, list]) -> None:
        """Each worker with entries copies its shards of the committed step (the only stall of a checkpoint)."""
    def checkpoint_write(self, folder: Path, entries: dict[int, list]) -> Any:
        """Start each worker writing its (tensor, box) entries from that copy into ``folder``, in the background;
        returns a handle for ``checkpoint_written``."""
    def checkpoint_written(self, writes: Any, wait_s: float = 0.0) -> dict[int, dict] | None:
        """Each writer's manifest entry once every write is done; None while some are running. Raises
        ``WorkerFailure`` if a writer died or failed."""
    def load_checkpoint(self, folder: Path, placement: Placement, step: int) -> None:
        """Form ``placement`` with every rank reading its boxes from the checkpoint ``folder`` (at ``step``)."""
    def gather_tensors(self) -> tuple[int, dict]:
        """(committed step, full training tensors) assembled on the driver (small models)."""
    @property
    def received_bytes(self) -> int:
        """Tensor bytes the driver has received in call results so far (an export's test reads it)."""
