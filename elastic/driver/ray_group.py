"""RayWorkerGroup: the ``WorkerGroup`` protocol's operations on Ray actors, one OS process per worker.

It hosts the TCPStore every gloo group rendezvouses through (it outlives any worker), owns the job's
placement and committed step, and carries out the protocol's operations (form a placement, step, run a
task, transfer and adopt, snapshot and restore, write and load checkpoints, gather) by composing three
pieces, one concept each:

- ``membership.py``: which workers exist, their warm-up, spares and replacements (the only creator of actors);
- ``calls.py``: fail-fast calls with deadlines: the first worker that dies or fails makes the others abort;
- ``builds.py``: the background skeleton builds (the only starter of builds).

Assumes ``ray.init`` has been called by the caller.
"""

from __future__ import annotations

import datetime
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist

from elastic.core.boxes import slices
from elastic.core.config import Config
from elastic.core.layout import Placement
from elastic.driver import ray_compat
from elastic.driver.builds import Builds
from elastic.driver.calls import Calls
from elastic.driver.group import Snapshot, WorkerFailure
from elastic.driver.membership import Membership, MembershipView
from elastic.model.specs import training_specs
from elastic.plan.memory_rounds import TransferWork
from elastic.runtime.engine import StepResult
from elastic.runtime.restore import FromCheckpoint, FromSnapshot
from elastic.runtime.tasks import ReadTensors, TrainStep, WorkerTask


class RayWorkerGroup(MembershipView):
    def __init__(self, cfg: Config, run_id: str | None = None) -> None:
        self._cfg = cfg
        self.run_id = run_id or uuid.uuid4().hex[:8]
        host = ray.util.get_node_ip_address()
        self.store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, use_libuv=True,
                                   timeout=datetime.timedelta(seconds=cfg.runtime.store_timeout_s))
        self.members = Membership(cfg, host, self.store.port)
        self.calls = Calls(self.members, self.store, cfg.runtime)
        self.builds = Builds(self.members, self.calls, self.next_group_name)
        self._placement: Placement | None = None
        self._active: str = ""  # the group set the placement trains on (what a failing step's abort cuts)
        self._committed = 0
        self._generation = 0
        self._bound: str | None = None  # the skeleton every member of the transfer's target holds

    @property
    def cfg(self) -> Config:
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: Config) -> None:  # a pool of workers serves several runs in turn
        if cfg != self._cfg:
            self.calls.configure(cfg.runtime)
        self._cfg = self.members.cfg = cfg

    @property
    def placement(self) -> Placement | None:
        return self._placement

    @property
    def committed(self) -> int:
        """Optimizer steps every rank has computed; their updates are applied or about to be."""
        return self._committed

    @property
    def received_bytes(self) -> int:
        return self.calls.received_bytes

    def draining_nodes(self) -> dict[str, float | None]:
        return ray_compat.draining_nodes()

    def cluster_cpus(self) -> float:
        return ray.cluster_resources().get("CPU", 2.0)

    def shutdown(self) -> None:
        self.members.remove(list(self.members.actors))
        self._placement = None

    # ---- training ------------------------------------------------------------------------
    def next_group_name(self) -> str:
        self._generation += 1
        return f"{self.run_id}/g{self._generation}"

    def _form(self, placement: Placement, call, bound: str | None = None) -> dict[int, Any]:
        """Every member of ``placement`` enters it with ``call(actor, group name)``, failing fast (``bound``: the
        skeleton group set they bind instead, if any). The set they then train on is the one a failing step cuts."""
        missing = [w for w in placement.workers if w not in self.members.actors]
        if missing:
            raise ValueError(f"placement {placement} names workers {missing} that this group does not have")
        self.builds.settle()
        name = self.next_group_name()
        calls = {w: call(self.members.actors[w], name) for w in placement.workers}
        entered = self.calls.gather(calls, members=placement.workers, forming=name, cut=[bound or ""], phase="enter")
        self._active = next(iter(entered.values()))["groups"]
        return entered

    def setup(self, placement: Placement, step: int = 0, empty: bool = False) -> float:
        times = self._form(placement, lambda a, name: a.start.remote(placement, name, step, self.cfg, empty))
        self._placement, self._committed = placement, step
        return max(t["total"] for t in times.values())

    def step(self, tasks: Mapping[int, WorkerTask] | None = None) -> dict[int, StepResult]:
        """One optimizer step on every rank of the current placement.

        The step counts as committed only when every rank has computed it; then every rank applies
        the update, so the step's time includes its update and whatever comes next (a reshard, a
        snapshot) starts from settled state. On a failure before the commit, survivors stay at the old
        step; on one after it, the ``WorkerFailure`` carries the step's results (see its docstring).
        """
        placement = self._require_placement()
        default = TrainStep()
        results = self.run({w: (tasks or {}).get(w, default) for w in placement.workers})
        self._committed += 1
        self.builds.pump()
        try:
            self.settle(placement.workers)
        except WorkerFailure as failure:
            failure.step_results = results
            raise
        return results

    def run(self, tasks: Mapping[int, WorkerTask]) -> dict[int, Any]:
        """Run a task on each of the given workers (a rollout, a read, a probe) and fail fast."""
        calls = {w: self.members.actors[w].run_task.remote(self._committed, task) for w, task in tasks.items()}
        phase = type(next(iter(tasks.values()))).__name__ if tasks else "task"  # a step, a rollout, a read ...
        return self.calls.gather(calls, members=list(tasks), cut=[self._active], phase=phase)

    def settle(self, workers: Iterable[int]) -> None:
        workers = [w for w in workers if w in self.members.actors]
        self.calls.gather({w: self.members.actors[w].sync.remote(self._committed) for w in workers}, members=workers,
                          cut=[self._active], phase="apply")

    def _require_placement(self) -> Placement:
        if self._placement is None:
            raise RuntimeError("no placement formed yet; call setup() first")
        return self._placement

    # ---- skeletons built ahead (builds.py) ------------------------------------------------------
    def prepare(self, placements: Iterable[Placement]) -> None:
        self.builds.ask(placements)

    def build_done(self, placement: Placement) -> bool:
        return self.builds.done(placement)

    # ---- live reshard ----------------------------------------------------------------------
    def transfer(self, new: Placement, work: TransferWork, step: int) -> dict[int, dict]:
        self.builds.settle()
        old = self._placement
        participants = sorted(set(new.workers) | set(work.movers))
        name = self.next_group_name()
        calls = {w: self.members.actors[w].transfer.remote(
            old, new, work.of(w), work.movers if w in work.movers else (), name, step) for w in participants}
        # On a failure only the transfer group is cut: the old engines and their groups stay intact.
        stats = self.calls.gather(calls, members=participants, forming=name, phase="transfer")
        # The commit binds skeletons only if every member of ``new`` holds the same group set's.
        names = {stats[w].get("skeleton") for w in new.workers}
        self._bound = names.pop() if len(names) == 1 else None
        return stats

    def cancel_transfer(self, workers: Iterable[int]) -> None:
        for w in workers:
            if w in self.members.actors:
                self.members.actors[w].cancel_transfer.remote()

    def commit(self, new: Placement) -> dict[int, dict]:
        # From here on the new placement's shards exist on its workers (staged): if a commit fails, the
        # job recovers from the new placement, not the old one.
        self._placement = new
        bound, self._bound = self._bound, None
        return self._form(new, lambda a, name: a.adopt.remote(name, bound), bound)

    def release(self, workers: Iterable[int], wait: bool = True) -> None:
        workers = list(workers)
        if self._placement is not None and set(self._placement.workers) <= set(workers):
            self._placement, self._committed = None, 0  # nobody holds the placement any more: the job is over
        refs = {w: self.members.actors[w].release.remote() for w in workers if w in self.members.actors}
        if wait:
            self.calls.gather(refs, members=list(refs), phase="release")

    # ---- snapshots ----------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """Copy every rank's shards now (the stall); the copies travel to the object store in the background,
        owned by this driver, so a snapshot outlives the worker it came from."""
        placement = self._require_placement()
        actors, started = self.members.actors, time.perf_counter()
        sizes = self.calls.gather({w: actors[w].snapshot_copy.remote(self._committed) for w in placement.workers},
                                  members=placement.workers, cut=[self._active], phase="snapshot")
        stall = time.perf_counter() - started
        refs = {w: actors[w].snapshot_take.remote() for w in placement.workers}
        return Snapshot(self._committed, placement, refs, sum(sizes.values()), stall, Travel(refs))

    def snapshot_status(self, snap: Snapshot, wait_s: float = 0.0) -> bool | None:
        """True once every part is held by the driver in its own node's object store (``Travel``): a part kept
        only on its worker's node would die with that node. False while some are on their way, None if a part
        was lost."""
        if not snap.travel.done.wait(wait_s):
            return False
        if snap.travel.ok:
            snap.parts = snap.travel.parts  # the driver's copies; the workers' are released with their refs
        return snap.travel.ok


    def restore(self, snap: Snapshot, new: Placement) -> None:
        source = FromSnapshot(snap.placement, {w: [ref] for w, ref in snap.parts.items()}, snap.step)
        self._form(new, lambda a, name: a.restore.remote(new, name, source, self.cfg))
        self._placement, self._committed = new, snap.step

    # ---- checkpoints and inspection ------------------------------------------------------------
    def checkpoint_copy(self, entries: dict[int, list]) -> None:
        workers = [w for w, items in entries.items() if items]
        self.calls.gather({w: self.members.actors[w].checkpoint_copy.remote(self._committed) for w in workers},
                          members=workers, cut=[self._active], phase="checkpoint copy")

    def checkpoint_write(self, folder: Path, entries: dict[int, list]) -> dict[int, ray.ObjectRef]:
        return {w: self.members.actors[w].checkpoint_write.remote(str(folder), items)
                for w, items in entries.items() if items}

    def checkpoint_written(self, writes: dict[int, ray.ObjectRef], wait_s: float = 0.0) -> dict[int, dict] | None:
        done, _ = ray.wait(list(writes.values()), num_returns=len(writes), timeout=wait_s)
        if len(done) < len(writes):
            return None
        return self.calls.gather(writes, members=list(writes), phase="checkpoint write")

    def load_checkpoint(self, folder: Path, placement: Placement, step: int) -> None:
        source = FromCheckpoint(str(folder))
        self._form(placement, lambda a, name: a.restore.remote(placement, name, source, self.cfg))
        self._placement, self._committed = placement, step

    def gather_tensors(self) -> tuple[int, dict[str, torch.Tensor]]:
        placement = self._require_placement()
        held = self.run({w: ReadTensors() for w in placement.workers})
        n_layers, full = self.cfg.model.n_layers, {}
        for spec in training_specs(self.cfg):
            out = None
            for rank, wid in enumerate(placement.workers):
                local = held[wid].get(spec.name)
                if local is not None:
                    out = torch.empty(spec.shape, dtype=local.dtype) if out is None else out
                    out[slices(placement.box(spec, rank, n_layers))] = local
            if out is None:
                raise RuntimeError(f"no worker holds {spec.name}")
            full[spec.name] = out
        return self._committed, full

    def ping(self, workers: Iterable[int]) -> dict[int, dict]:
        """Each worker's identity, asked now: a check that they still answer (tests)."""
        return self.calls.ping(workers)


class Travel:
    """Brings a snapshot's parts to the driver's node on a thread of its own, while training goes on, and
    keeps them there as the driver's own objects.

    Why a thread: Ray pulls an object to the caller's node only while a ``ray.wait(fetch_local=True)`` or a
    ``ray.get`` for it is pending, and cancels the pull when that call returns; a non-blocking look after
    every step (``timeout=0``) started a pull and cancelled it at once, so the copies of workers on other nodes
    never arrived and snapshots stopped counting after the first (``bench/failures.py`` showed a recovery
    from a snapshot six steps old while one was taken every one or two).

    Why ``ray.put`` again: a copy pulled to another node is a *secondary* copy, which Ray may evict under
    memory pressure; when the worker's node then dies the object is lost with it (``bench/failures.py`` saw
    ``ObjectReconstructionFailedError`` restoring such a snapshot after a node loss). Put by the driver, the
    part's primary copy lives in the driver node's store, pinned while the snapshot is referenced, and the
    worker-node copy is released. One part at a time, so the driver holds at most one part's tensors.

    ``ok``: every part arrived (None: a worker died before handing its part over); ``parts``: the driver's."""

    def __init__(self, refs: dict) -> None:
        self.done, self.ok, self.parts = threading.Event(), None, {}
        threading.Thread(target=self._run, args=(refs,), daemon=True, name="snapshot-travel").start()

    def _run(self, refs: dict) -> None:
        try:
            for worker, ref in refs.items():
                self.parts[worker] = ray.put(ray.get(ref))
            self.ok = True
        except Exception:  # a worker died before handing its part over, or its node went with the part
            self.ok, self.parts = None, {}
        finally:
            self.done.set()
