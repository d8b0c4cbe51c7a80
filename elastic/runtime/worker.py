"""The Ray actor that hosts one worker: a thin shell over an Engine.

Each worker is a real OS process with a stable integer id. It joins one gloo group per placement
and keeps running across reshards and recoveries. The actor is threaded (``max_concurrency``) so
control calls (``abort``, ``info``) are served while a step is blocked in a collective; all torch
work runs on a single thread.

What the worker holds, for the placement the driver last told it about:
- ``engine``: the model and optimizer shards of ``placement``. A step's update is applied only
  once the driver commits it (``Engine.sync``), so all survivors of a failure agree on the step;
- ``staged``: shards received for a new placement, kept until ``adopt`` builds an engine from them.
Either can serve as the source of a reshard or a recovery, so a failure at any point leaves
every survivor's shards usable;
- ``skeletons``: engine skeletons of placements it may train on next (``runtime/skeletons.py``), built on
  a background thread (``build``) while training goes on. Entering a placement with a skeleton only
  switches the default group and binds the tensors; the engine it leaves is parked there in turn.

A worker enters a placement in one of three ways: ``start`` (from the seed, or empty for a load that
follows), ``adopt`` (the shards a transfer staged: the commit of a live reshard) and ``restore`` (from a
snapshot or a checkpoint, ``runtime/restore.py``). Everything else the driver asks travels as a typed task
(``runtime/tasks.py``: training steps, reads of the tensors, checkpoint shards, probes) through
``run_task``. Only ``driver/membership.py`` creates this actor; the driver's other modules call it.

Threads: torch work runs on the compute thread; ``build`` on the build thread; ``abort``, ``cut_group``,
``cancel_transfer``, ``snapshot_take`` and ``forget_workers`` on control threads, so they are served while a
step is blocked. ``_lock`` guards what both sides write: the staged shards and the snapshot copy.

Failure handling: on a failed task, or when the driver calls ``abort``, the worker shuts down its
gloo sockets (``parallel/abort.py``): peers blocked on it fail at once rather than after a
collective timeout. Its tensors stay in memory; only the process groups are lost. The failure's
traceback travels with it (``StepFailed.detail``), for ``--debug``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

import ray
import torch

from elastic.core import checkpoint as ckpt
from elastic.core.config import Config
from elastic.core.layout import Placement
from elastic.model.hf import BoxReader
from elastic.model.specs import DTYPE, rank_boxes
from elastic.plan.memory_rounds import DISK
from elastic.runtime import transfer
from elastic.runtime.engine import Engine, StepResult
from elastic.runtime.failures import StepFailed, failure
from elastic.runtime.liveness import ComputeThread
from elastic.runtime.parallel import connections
from elastic.runtime.parallel.groups import LayoutGroups
from elastic.runtime.rss import PeakWatch, current
from elastic.runtime.skeletons import BuildOrder, Skeleton, SkeletonCache
from elastic.runtime.tasks import TaskContext, WorkerTask

log = logging.getLogger(__name__)

# Torch work runs on one dedicated thread ("compute"): DTensor caches its sharding decisions per
# thread, and a fresh thread pays ~1 s to rebuild them. Control calls get threads of their own so
# they are served while a step is blocked in a collective.
def COMPUTE(method):  # noqa: N802 (reads like the other two concurrency groups)
    """A method on the compute thread; entering it is what the driver's hang probe counts as progress."""

    @functools.wraps(method)
    def entered(self, *args, **kwargs):
        self.compute.enter(method.__name__)
        return method(self, *args, **kwargs)

    return ray.method(concurrency_group="compute")(entered)


CONTROL = ray.method(concurrency_group="control")
# Skeletons are built on a thread of their own, one at a time, in the order the driver sent them.
BUILD = ray.method(concurrency_group="build")
# Checkpoint shards are written on a thread of their own, from a copy, while training goes on.
IO = ray.method(concurrency_group="io")


@ray.remote(concurrency_groups={"compute": 1, "control": 4, "build": 1, "io": 1})
class Worker:
    def __init__(self, worker_id: int, cfg: Config, store_host: str, store_port: int) -> None:
        self.id, self.cfg = worker_id, cfg
        self.store_addr = (store_host, store_port)
        torch.set_num_threads(cfg.runtime.threads_per_worker)
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format=f"[worker {worker_id}] %(levelname)s %(name)s: %(message)s")
        self.engine: Engine | None = None
        self.groups: LayoutGroups | None = None  # the engine's groups (None for a one-rank placement)
        self.placement: Placement | None = None
        self.skeletons = SkeletonCache(cfg.runtime.skeletons)
        self._broken = False  # the engine's groups were cut by a failure: close them rather than park them
        self.staged: tuple[Placement, dict[str, torch.Tensor], int] | None = None
        self.scratch: dict = {}  # tasks' per-engine caches (see runtime/tasks.py), emptied with each new engine
        self._snapshot = None
        self._checkpoint = None  # (step, placement, copies) until the io thread has written them
        self.compute = ComputeThread()
        self.idle_rss = 0  # resident bytes after warm-up, before any model: what a step's peak is measured above
        self._lock = threading.Lock()  # staged and _snapshot: written by the compute and the control threads

    # ---- identity, liveness and warm-up -----------------------------------------------------
    @CONTROL
    def info(self) -> dict:
        return {"id": self.id, "pid": os.getpid(), "host": socket.gethostname(),
                "node_id": ray.get_runtime_context().get_node_id()}

    @CONTROL
    def probe(self) -> dict:
        """What the compute thread is doing (``runtime/liveness.py``): the driver's hang check. A stopped process
        cannot answer it; a live one answers from a control thread whatever its compute thread is stuck in."""
        return self.compute.probe()

    @COMPUTE
    def warmup(self, full: bool = True, delay_s: float = 0.0) -> dict:
        """Pay one-off costs before this worker is needed (dataset, FSDP/DTensor code paths); ``full=False``
        only reports in (the process is up and its imports are done, what a restarted torchrun worker pays).
        ``delay_s``: wait first (the backoff of a retried warm-up)."""
        time.sleep(delay_s)
        if full:
            from elastic.runtime.parallel.warm import warm_up

            warm_up(self.cfg)
        self.idle_rss = current()
        return {**self.info(), "idle_rss": self.idle_rss}

    # ---- skeletons (the build thread) -----------------------------------------------------
    @BUILD
    def build(self, order: BuildOrder) -> dict:
        """Build the order's engine skeleton and form its groups, in the background (training goes on)."""
        placement = order.placement
        rank = placement.rank_of(self.id)
        if rank is None:
            raise ValueError(f"worker {self.id} is not part of placement {placement}")
        try:
            return self.skeletons.build(self.cfg, order, rank, lambda: self._form_groups(placement, order.group))
        except Exception as err:
            raise failure(self.id, f"building {placement.layout}", err) from None

    @CONTROL
    def forget_workers(self, workers: list[int]) -> int:
        """Drop the skeletons of placements that name a lost worker; returns how many."""
        return len(self.skeletons.forget_workers(set(workers)))

    # ---- entering a placement: start, adopt, restore ------------------------------------------
    @COMPUTE
    def start(self, placement: Placement, group: str, step: int, cfg: Config, empty: bool = False) -> dict:
        """Join ``placement``'s groups (formed now as ``group``) and build an engine from the seed, or unfilled
        (``empty``) for a load that follows. ``cfg`` replaces the worker's config (a pool of workers serves
        several runs in turn)."""
        return self._enter(placement, group, None, step, cfg, empty=empty)

    @COMPUTE
    def adopt(self, group: str, bound: str | None = None) -> dict[str, float]:
        """Enter the placement whose shards the last transfer staged (the commit of a live reshard). ``bound``:
        the group-set name of the skeleton every member holds for it (the driver checked), which is then bound;
        otherwise the groups are formed now as ``group`` and an engine is built."""
        with self._lock:
            staged = self.staged
        if staged is None:
            raise StepFailed(self.id, "has no transferred shards to commit")
        new, tensors, step = staged
        return self._enter(new, group, tensors, step, bound=bound)

    @COMPUTE
    def restore(self, placement: Placement, group: str, source, cfg: Config) -> dict[str, float]:
        """Enter ``placement`` with this rank's shards read from ``source`` (``runtime/restore.py``: a snapshot's
        parts or a checkpoint folder), at the step it holds."""
        self._use_config(cfg)
        tensors, step = source.read(self.cfg, rank_boxes(self.cfg, placement, self.id), DTYPE[self.cfg.train.dtype])
        return self._enter(placement, group, tensors, step)

    def _enter(self, placement: Placement, group: str, tensors: dict[str, torch.Tensor] | None, step: int,
               cfg: Config | None = None, empty: bool = False, bound: str | None = None) -> dict[str, float]:
        """Leave the current placement and enter ``placement`` (see the three entry points). Returns the seconds
        spent leaving, forming groups and building the engine, and whether a skeleton was bound."""
        started = time.perf_counter()
        rank = placement.rank_of(self.id)
        if rank is None:
            raise ValueError(f"worker {self.id} is not part of placement {placement}")
        self._leave_engine(keep=cfg is None or cfg == self.cfg)
        if cfg is not None:
            self._use_config(cfg)
        left = time.perf_counter()
        held = self.skeletons.take(placement, bound if tensors is not None and not empty else None)
        if held is not None:
            self.groups = held.groups
        else:
            self.groups = self._form_groups(placement, group) if placement.layout.world > 1 else None
        if self.groups is not None:
            self.groups.activate()
        formed = time.perf_counter()
        if held is not None:
            self.engine = held.engine
            self.engine.bind(tensors, step)
        else:
            mesh = self.groups.mesh if self.groups is not None else None
            self.engine = Engine(self.cfg, placement, rank, mesh, tensors=tensors, step=step, empty=empty)
        self.placement = placement
        with self._lock:
            self.staged = None
        done = time.perf_counter()
        return {"leave": left - started, "group": formed - left, "engine": done - formed, "total": done - started,
                "bound": held is not None, "groups": self.groups.name if self.groups is not None else ""}

    def _leave_engine(self, keep: bool = True) -> None:
        """Leave the current placement: park its engine as a skeleton (``keep``, and its groups unbroken), else
        destroy it and its groups. Either way no default group is left."""
        engine, groups, placement = self.engine, self.groups, self.placement
        self.engine = self.groups = None
        self.scratch = {}
        connections.set_default_group(None)
        if engine is None:
            return
        if keep and not self._broken and self.skeletons.limit > 0 and engine.cfg is self.cfg:
            engine.park()
            self.skeletons.put(Skeleton(placement, groups, engine))
        else:
            engine.close()
            if groups is not None:
                groups.close()
        self._broken = False

    def _use_config(self, cfg: Config) -> None:
        if cfg != self.cfg:
            self.cfg = cfg
            self.skeletons.clear()  # skeletons of another run's config do not fit

    def _form_groups(self, placement: Placement, name: str) -> LayoutGroups:
        runtime = self.cfg.runtime
        return LayoutGroups(self._store(), name, placement.rank_of(self.id), placement.layout,
                            runtime.store_timeout_s, connections.SOCKETS, runtime.collective_timeout_s)

    def _store(self):
        return connections.store_client(*self.store_addr, self.cfg.runtime.store_timeout_s)

    # ---- tasks ----------------------------------------------------------------------------
    @COMPUTE
    def run_task(self, committed: int, task: WorkerTask):
        """Apply the committed update if one is pending, then run ``task`` (a training step leaves its own
        update pending until the driver commits it; see ``Engine.sync``)."""
        engine = self.engine
        if engine is None and getattr(task, "needs_engine", True):
            raise StepFailed(self.id, "has no engine (never set up)")
        try:
            t0 = time.perf_counter()
            watch = PeakWatch()
            watch.start()
            if engine is not None:
                engine.sync(committed)
            t1 = time.perf_counter()
            result = task.run(TaskContext(self.id, engine, self.scratch, self.skeletons))
            if isinstance(result, StepResult):  # the step's peak, for the planner's memory model
                result.apply_seconds = t1 - t0
                peak = watch.peak()
                result.peak_bytes = max(0, peak - self.idle_rss) if peak and self.idle_rss else 0
            return result
        except Exception as err:  # a dead peer, an abort, or a real bug: fail fast with the reason
            what = f"{type(task).__name__} at step {engine.step}" if engine is not None else type(task).__name__
            error = failure(self.id, what, err)
            err.__traceback__ = None
        self._abort_busy()  # peers blocked on us fail now, not after a timeout
        raise error

    @COMPUTE
    def sync(self, committed: int) -> int:
        """Apply the pending update if the job committed it, else drop it (see ``Engine.sync``)."""
        if self.engine is not None:
            self.engine.sync(committed)
        return committed

    # ---- failures (control threads) ---------------------------------------------------------
    def _abort_busy(self) -> int:
        """Cut the groups of the engine's placement (a failed task): peers blocked on this worker fail now."""
        groups = self.groups
        return self.abort(groups.name) if groups is not None else 0

    @CONTROL
    def abort(self, name: str) -> int:
        """Cut the gloo connections of the group set ``name`` (the one the driver's failing call used), so that
        operations blocked on them fail at once, here and on the peers. Its tensors stay (they may serve a
        recovery), and so do other sets: the next placement's or the fallback's skeleton, or groups a recovery
        formed after the failure, which a late abort must not touch. A cut set never trains again: the engine
        on it is destroyed when the worker leaves it, a skeleton on it is dropped now."""
        groups = self.groups
        if groups is not None and groups.name == name:
            self._broken = True
        cut = connections.abort_groups(name)
        self.skeletons.discard_group(name)
        return cut

    # ---- live reshard: transfer, then adopt -------------------------------------------------
    def _holdings(self, placement: Placement | None, committed: int) -> dict[str, torch.Tensor]:
        """This worker's tensors for ``placement`` at step ``committed`` (views, not copies)."""
        if placement is None or placement.rank_of(self.id) is None:
            return {}
        with self._lock:
            staged = self.staged
        if staged is not None and staged[0] == placement:
            if staged[2] != committed:
                raise StepFailed(self.id, f"holds step {staged[2]} but the job is at step {committed}")
            return staged[1]
        if self.engine is not None and self.placement == placement:
            self.engine.sync(committed)
            return self.engine.local_tensors()
        raise StepFailed(self.id, f"holds no shards of placement {placement}")

    @COMPUTE
    def transfer(self, old: Placement | None, new: Placement, work: list, movers: tuple[int, ...],
                 group: str, step: int) -> dict:
        """Build this worker's shards of ``new`` from the plan (``work``: (round, tag, transfer)).

        The workers with remote pieces (``movers``) meet in a standalone gloo group ``group``.
        Sources are this worker's shards of ``old`` at step ``step``, which stay untouched.
        """
        started = time.perf_counter()
        old_tensors = self._holdings(old, step)
        pg = None
        if self.id in movers:
            pg = connections.standalone_group(self._store(), group, movers.index(self.id), len(movers),
                                              self.cfg.runtime.collective_timeout_s)
        joined = time.perf_counter()
        dtype = DTYPE[self.cfg.train.dtype]
        # The base folder is opened only when the plan reads pieces from it (not on every reshard's stall).
        reader = BoxReader(self.cfg.train.init_from, self.cfg.model) if any(r == DISK for r, _, _ in work) else None
        try:
            new_tensors, stats = transfer.execute(
                work, self.id, old_tensors, rank_boxes(self.cfg, old, self.id), rank_boxes(self.cfg, new, self.id),
                dtype, pg, {w: i for i, w in enumerate(movers)}, self.cfg.runtime.reshard_pack_bytes,
                None if reader is None else lambda name, box: reader.read(name, box, dtype))
        except Exception as err:
            connections.abort_groups(group)
            raise failure(self.id, "reshard transfer", err) from None
        finally:
            del pg
            connections.close_standalone(group)
        if new.rank_of(self.id) is not None:
            with self._lock:
                self.staged = (new, new_tensors, step)
        out = dataclasses.asdict(stats)
        out.update(group_seconds=joined - started, wall_seconds=time.perf_counter() - started,
                   skeleton=self.skeletons.name_of(new) if new.rank_of(self.id) is not None else None)
        return out

    @CONTROL
    def cancel_transfer(self) -> None:
        """Forget a transfer that will not be committed (the old engine was never touched)."""
        with self._lock:
            self.staged = None

    @COMPUTE
    def release(self) -> None:
        """Leave training (drained or idle): drop the engine, the staged shards, the skeletons and the groups."""
        self._leave_engine(keep=False)
        self.skeletons.clear()
        with self._lock:
            self.staged = None

    # ---- snapshots ----------------------------------------------------------------------------
    @COMPUTE
    def snapshot_copy(self, committed: int) -> int:
        """Copy this worker's shards at ``committed`` (the only part that holds up training)."""
        with self._lock:
            staged = self.staged
        placement = staged[0] if staged else self.placement
        copy = (committed, placement, {k: v.clone() for k, v in self._holdings(placement, committed).items()})
        with self._lock:
            self._snapshot = copy
        return sum(v.numel() * v.element_size() for v in copy[2].values())

    @COMPUTE
    def checkpoint_copy(self, committed: int) -> int:
        """Copy this worker's shards at ``committed`` for a checkpoint written in the background (the stall)."""
        with self._lock:
            staged = self.staged
        placement = staged[0] if staged else self.placement
        copy = (committed, placement, {k: v.clone() for k, v in self._holdings(placement, committed).items()})
        with self._lock:
            self._checkpoint = copy
        return sum(v.numel() * v.element_size() for v in copy[2].values())

    @IO
    def checkpoint_write(self, folder: str, entries: list) -> dict:
        """Write ``entries`` ((tensor, box) pairs) from the checkpoint copy into ``folder``, fsynced, then drop the
        copy; returns the manifest entry of the file. Runs beside the training steps."""
        with self._lock:
            copy, self._checkpoint = self._checkpoint, None
        if copy is None:
            raise StepFailed(self.id, "has no checkpoint copy to write")
        step, placement, tensors = copy
        try:
            return ckpt.write_shard(Path(folder), self.id, tensors, entries, rank_boxes(self.cfg, placement, self.id))
        except Exception as err:
            raise failure(self.id, f"writing the checkpoint of step {step}", err) from None

    @CONTROL
    def snapshot_take(self) -> tuple[int, Placement, dict[str, torch.Tensor]]:
        """Hand the copy to the caller, who then owns it in Ray's object store: it outlives this
        process. Runs beside the next step, so storing it is off the hot path."""
        with self._lock:
            snap, self._snapshot = self._snapshot, None
        return snap
