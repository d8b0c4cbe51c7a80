"""The Ray actor that hosts one worker: a thin shell over an Engine.

Each worker is a real OS process with a stable integer id. It joins one gloo group per placement
and keeps running across reshards and recoveries. The actor is threaded (``max_concurrency``) so
control calls (``abort``, ``info``) are served while a step is blocked in a collective; all torch
work runs on a single thread.

What the worker holds, for the placement the driver last told it about:
- ``engine``: the model and optimizer shards of ``placement``. A step's update is applied only
  once the driver commits it (``Engine.sync``), so all survivors of a failure agree on the step;
- ``staged``: shards received for a new placement, kept until the commit builds an engine.
Either can serve as the source of a reshard or a recovery, so a failure at any point leaves
every survivor's shards usable;
- ``skeletons``: engine skeletons of placements it may train on next (``runtime/skeletons.py``), built on
  a background thread (``prepare``) while training goes on. A commit onto a placement with a skeleton only
  switches the default group and binds the tensors; the engine it leaves is parked there in turn.

Training code reaches the worker as typed tasks (``runtime/tasks.py``): ``run_task`` settles the engine
at the job's committed step and runs the task. Only ``driver/ray_group.py`` calls these methods.

Failure handling: on a failed task, or when the driver calls ``abort``, the worker shuts down its
gloo sockets (``parallel/abort.py``): peers blocked on it fail at once rather than after a
collective timeout. Its tensors stay in memory; only the process groups are lost. The failure's
traceback travels with it (``StepFailed.detail``), for ``--debug``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import threading
import time
import traceback

import ray
import torch

from elastic.core import checkpoint as ckpt
from elastic.core.config import Config
from elastic.core.layout import Box, Placement, intersect, relative
from elastic.model.hf import BoxReader
from elastic.model.specs import training_specs
from elastic.plan.memory_rounds import DISK
from elastic.runtime import transfer
from elastic.runtime.engine import DTYPE, Engine, StepResult
from elastic.runtime.parallel import mesh as meshlib
from elastic.runtime.parallel.groups import LayoutGroups
from elastic.runtime.skeletons import Skeleton, SkeletonCache
from elastic.runtime.tasks import TaskContext, WorkerTask

log = logging.getLogger(__name__)


class StepFailed(RuntimeError):
    """A worker's call failed; ``worker`` names it, the message says why, ``detail`` is the traceback."""

    def __init__(self, worker: int, message: str, detail: str = "") -> None:
        super().__init__(worker, message, detail)  # args stay (worker, message, detail): the error pickles
        self.worker, self.message, self.detail = worker, message, detail

    def __str__(self) -> str:
        return f"worker {self.worker}: {self.message}"


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"


def _failure(worker: int, what: str, err: BaseException) -> StepFailed:
    """The error the driver sees: one line of reason, and the worker-side traceback as detail."""
    detail = "".join(traceback.format_exception(err))
    log.debug("worker %d: %s failed:\n%s", worker, what, detail)
    return StepFailed(worker, f"{what} failed: {_first_line(err)}", detail)


# Torch work runs on one dedicated thread ("compute"): DTensor caches its sharding decisions per
# thread, and a fresh thread pays ~1 s to rebuild them. Control calls get threads of their own so
# they are served while a step is blocked in a collective.
COMPUTE = ray.method(concurrency_group="compute")
CONTROL = ray.method(concurrency_group="control")
# Skeletons are built on a thread of their own, one at a time, in the order the driver sent them.
PREPARE = ray.method(concurrency_group="prepare")


@ray.remote(concurrency_groups={"compute": 1, "control": 4, "prepare": 1})
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
        self._lock = threading.RLock()

    # ---- identity and warm-up -----------------------------------------------------------
    @CONTROL
    def info(self) -> dict:
        return {"id": self.id, "pid": os.getpid(), "host": socket.gethostname(),
                "node_id": ray.get_runtime_context().get_node_id()}

    @CONTROL
    def started(self) -> dict:
        """The process is up and its imports are done (what a restarted torchrun worker has paid)."""
        return self.info()

    @COMPUTE
    def warmup(self) -> dict:
        """Pay one-off costs before this worker is needed (dataset, FSDP/DTensor code paths)."""
        from elastic.runtime.parallel.warm import warm_up

        warm_up(self.cfg)
        return self.info()

    # ---- helpers --------------------------------------------------------------------------
    def _store(self):
        return meshlib.store_client(*self.store_addr, self.cfg.runtime.store_timeout_s)

    def _boxes(self, placement: Placement | None) -> dict[str, Box]:
        rank = placement.rank_of(self.id) if placement is not None else None
        if rank is None:
            return {}
        n = self.cfg.model.n_layers
        return {s.name: b for s in training_specs(self.cfg) if (b := placement.box(s, rank, n)) is not None}

    def _holdings(self, placement: Placement | None, committed: int) -> dict[str, torch.Tensor]:
        """This worker's tensors for ``placement`` at step ``committed`` (views, not copies)."""
        if placement is None or placement.rank_of(self.id) is None:
            return {}
        if self.staged is not None and self.staged[0] == placement:
            if self.staged[2] != committed:
                raise StepFailed(self.id, f"holds step {self.staged[2]} but the job is at step {committed}")
            return self.staged[1]
        if self.engine is not None and self.placement == placement:
            self.engine.sync(committed)
            return self.engine.local_tensors()
        raise StepFailed(self.id, f"holds no shards of placement {placement}")

    def _leave_engine(self, keep: bool = True) -> None:
        """Leave the current placement: park its engine as a skeleton (``keep``, and its groups unbroken), else
        destroy it and its groups. Either way no default group is left."""
        engine, groups, placement = self.engine, self.groups, self.placement
        self.engine = self.groups = None
        self.scratch = {}
        meshlib.set_default_group(None)
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
                            runtime.store_timeout_s, meshlib.SOCKETS, runtime.collective_timeout_s)

    # ---- groups and engines -------------------------------------------------------------
    @PREPARE
    def prepare(self, placement: Placement, group: str) -> dict:
        """Build ``placement``'s engine skeleton and form its groups, in the background (training goes on)."""
        rank = placement.rank_of(self.id)
        if rank is None:
            raise ValueError(f"worker {self.id} is not part of placement {placement}")
        try:
            return self.skeletons.prepare(self.cfg, placement, rank, group,
                                          lambda: self._form_groups(placement, group))
        except Exception as err:
            raise _failure(self.id, f"preparing {placement.layout}", err) from None

    @CONTROL
    def skeleton_placements(self) -> list[Placement]:
        """The placements this worker holds skeletons of (tests and benchmarks)."""
        return self.skeletons.placements()

    @COMPUTE
    def drop_skeletons(self) -> int:
        """Drop every skeleton (benchmarks measure the rebuild path this way); returns how many there were."""
        n = len(self.skeletons.placements())
        self.skeletons.clear()
        return n

    @CONTROL
    def forget_workers(self, workers: list[int]) -> int:
        """Drop the skeletons of placements that name a lost worker; returns how many."""
        return len(self.skeletons.forget_workers(set(workers)))

    @COMPUTE
    def setup(self, placement: Placement, group: str, tensors: dict[str, torch.Tensor] | None = None,
              step: int = 0, cfg: Config | None = None, empty: bool = False,
              skeleton: str | None = None) -> dict[str, float]:
        """Join ``placement``'s group and build an engine from ``tensors`` (None: from the seed).

        ``skeleton``: the group-set name of the skeleton every member holds for ``placement`` (the driver checked).
        Then its groups are made the default and the tensors bound into it; otherwise the groups are formed now
        under the name ``group`` and an engine built.
        ``cfg`` replaces the worker's config (a pool of workers can serve several runs in turn).
        Returns the seconds spent leaving the old placement, forming groups, building the engine, and whether
        a skeleton was used.
        """
        with self._lock:
            started = time.perf_counter()
            rank = placement.rank_of(self.id)
            if rank is None:
                raise ValueError(f"worker {self.id} is not part of placement {placement}")
            self._leave_engine(keep=cfg is None or cfg == self.cfg)
            if cfg is not None:
                self._use_config(cfg)
            left = time.perf_counter()
            held = self.skeletons.take(placement, skeleton if tensors is not None and not empty else None)
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
            self.placement, self.staged = placement, None
            done = time.perf_counter()
            return {"leave": left - started, "group": formed - left, "engine": done - formed, "total": done - started,
                    "skeleton": held is not None}

    @COMPUTE
    def run_task(self, committed: int, task: WorkerTask):
        """Apply the committed update if one is pending, then run ``task`` (a training step leaves its own
        update pending until the driver commits it; see ``Engine.sync``)."""
        with self._lock:
            engine = self.engine
            if engine is None:
                raise StepFailed(self.id, "has no engine (never set up)")
            try:
                t0 = time.perf_counter()
                engine.sync(committed)
                t1 = time.perf_counter()
                result = task.run(TaskContext(self.id, engine, self.scratch))
                if isinstance(result, StepResult):
                    result.apply_seconds = t1 - t0
                return result
            except Exception as err:  # a dead peer, an abort, or a real bug: fail fast with the reason
                failure = _failure(self.id, f"{type(task).__name__} at step {engine.step}", err)
                err.__traceback__ = None
            self._abort_busy()  # peers blocked on us fail now, not after a timeout
            raise failure

    @COMPUTE
    def sync(self, committed: int) -> int:
        """Apply the pending update if the job committed it, else drop it (see ``Engine.sync``)."""
        with self._lock:
            if self.engine is not None:
                self.engine.sync(committed)
            return committed

    def _abort_busy(self) -> int:
        self._broken = True
        return meshlib.abort_groups(keep=self.skeletons.group_names())

    @CONTROL
    def abort(self) -> int:
        """Cut this worker's gloo connections, but those of idle skeletons; its tensors stay (they may serve a
        recovery), and so does the skeleton of the placement it may recover onto."""
        return self._abort_busy()

    @CONTROL
    def cut_group(self, name: str) -> int:
        """Cut only the gloo group ``name`` (a reshard transfer): the engine and its group stay intact."""
        return meshlib.abort_groups(name)

    # ---- live reshard and recovery (transfer, then commit) ---------------------------------
    @COMPUTE
    def transfer(self, old: Placement | None, new: Placement, work: list, movers: tuple[int, ...],
                 group: str, step: int) -> dict:
        """Phase 1: build this worker's shards of ``new`` from the plan (``work``: (round, tag, transfer)).

        The workers with remote pieces (``movers``) meet in a standalone gloo group ``group``.
        Sources are this worker's shards of ``old`` at step ``step``, which stay untouched.
        """
        started = time.perf_counter()
        with self._lock:
            old_tensors = self._holdings(old, step)
        pg = None
        if self.id in movers:
            pg = meshlib.standalone_group(self._store(), group, movers.index(self.id), len(movers),
                                          self.cfg.runtime.collective_timeout_s)
        joined = time.perf_counter()
        dtype = DTYPE[self.cfg.train.dtype]
        # The base folder is opened only when the plan reads pieces from it (not on every reshard's stall).
        reader = BoxReader(self.cfg.train.init_from, self.cfg.model) if any(r == DISK for r, _, _ in work) else None
        try:
            new_tensors, stats = transfer.execute(work, self.id, old_tensors, self._boxes(old), self._boxes(new),
                                       dtype, pg, {w: i for i, w in enumerate(movers)},
                                       self.cfg.runtime.reshard_pack_bytes,
                                       None if reader is None else lambda name, box: reader.read(name, box, dtype))
        except Exception as err:
            meshlib.abort_groups(group)
            raise _failure(self.id, "reshard transfer", err) from None
        finally:
            del pg
            meshlib.close_standalone(group)
        with self._lock:
            if new.rank_of(self.id) is not None:
                self.staged = (new, new_tensors, step)
        out = dataclasses.asdict(stats)
        out.update(group_seconds=joined - started, wall_seconds=time.perf_counter() - started,
                   skeleton=self.skeletons.name_of(new) if new.rank_of(self.id) is not None else None)
        return out

    @COMPUTE
    def commit(self, group: str, skeleton: str | None = None) -> dict[str, float]:
        """Phase 2: leave the old group; bind the skeleton ``skeleton`` that every member holds (see ``setup``), or
        join the new placement's group ``group`` and build the engine."""
        if self.staged is None:
            raise StepFailed(self.id, "has no transferred shards to commit")
        new, tensors, step = self.staged
        return self.setup(new, group, tensors=tensors, step=step, skeleton=skeleton)

    @CONTROL
    def cancel_transfer(self) -> None:
        """Forget a transfer that will not be committed (the old engine was never touched)."""
        self.staged = None

    @COMPUTE
    def release(self) -> None:
        """Leave training (drained or idle): drop the engine, the staged shards, the skeletons and the groups."""
        with self._lock:
            self._leave_engine(keep=False)
            self.skeletons.clear()
            self.staged = None

    # ---- snapshots, checkpoints, inspection -----------------------------------------------
    @COMPUTE
    def snapshot_copy(self, committed: int) -> int:
        """Copy this worker's shards at ``committed`` (the only part that holds up training)."""
        with self._lock:
            placement = self.staged[0] if self.staged else self.placement
            self._snapshot = (committed, placement,
                              {k: v.clone() for k, v in self._holdings(placement, committed).items()})
            return sum(v.numel() * v.element_size() for v in self._snapshot[2].values())

    @CONTROL
    def snapshot_take(self) -> tuple[int, Placement, dict[str, torch.Tensor]]:
        """Hand the copy to the caller, who then owns it in Ray's object store: it outlives this
        process. Runs beside the next step (no lock), so storing it is off the hot path."""
        snap, self._snapshot = self._snapshot, None
        return snap

    @COMPUTE
    def restore(self, new: Placement, group: str, old: Placement, sources: dict[int, list], step: int,
                cfg: Config) -> dict:
        """Build this worker's shards of ``new`` from snapshot objects (old worker -> [ref]), then an engine."""
        self._use_config(cfg)
        wanted = self._boxes(new)
        old_boxes = {w: {s.name: b for s in training_specs(self.cfg)
                         if (b := old.box(s, old.rank_of(w), self.cfg.model.n_layers)) is not None}
                     for w in old.workers}
        tensors = {name: torch.empty(tuple(hi - lo for lo, hi in box), dtype=DTYPE[self.cfg.train.dtype])
                   for name, box in wanted.items()}
        for worker, boxes in old_boxes.items():
            if not any(intersect(boxes[n], b) for n, b in wanted.items() if n in boxes):
                continue
            snap_step, _, snapped = ray.get(sources[worker][0])
            if snap_step != step:
                raise StepFailed(self.id, f"snapshot of worker {worker} is at step {snap_step}, not {step}")
            for name, box in wanted.items():
                piece = intersect(boxes[name], box) if name in boxes else None
                if piece is not None:
                    src = tuple(slice(lo, hi) for lo, hi in relative(piece, boxes[name]))
                    dst = tuple(slice(lo, hi) for lo, hi in relative(piece, box))
                    tensors[name][dst] = snapped[name][src]
        return self.setup(new, group, tensors=tensors, step=step)

    @COMPUTE
    def local_tensors(self, committed: int) -> tuple[int, dict[str, torch.Tensor]]:
        """(step, copies of this worker's tensors) for the driver."""
        with self._lock:
            placement = self.staged[0] if self.staged else self.placement
            return committed, {k: v.clone() for k, v in self._holdings(placement, committed).items()}

    @COMPUTE
    def save_shard(self, folder: str, entries: list, committed: int) -> dict:
        with self._lock:
            tensors = self._holdings(self.placement, committed)
            return ckpt.write_shard(ckpt.Path(folder), self.id, tensors, entries, self._boxes(self.placement))

    @COMPUTE
    def load_checkpoint(self, placement: Placement, group: str, folder: str, cfg: Config) -> dict:
        self._use_config(cfg)
        checkpoint = ckpt.open_checkpoint(ckpt.Path(folder), self.cfg, training_specs(self.cfg), verify=False)
        tensors = ckpt.read_boxes(checkpoint, self._boxes(placement), DTYPE[self.cfg.train.dtype])
        return self.setup(placement, group, tensors=tensors, step=checkpoint.step)

    # ---- measurement (benchmarks) -----------------------------------------------------------
    @CONTROL
    def memory(self, reset_peak: bool = False) -> dict[str, int]:
        """Resident and peak resident bytes of this process (Linux); ``reset_peak`` restarts the peak."""
        if reset_peak:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        fields = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(value.split()[0]) * 1024
        return {"rss": fields["VmRSS"], "peak": fields["VmHWM"]}

    @COMPUTE
    def probe_flows(self, group: str, members: tuple[int, ...], sends: tuple[int, ...], receives: tuple[int, ...],
                    nbytes: int, repeats: int = 2) -> float:
        """Seconds for this worker's part of a probe in which every (sender, receiver) pair sends ``nbytes`` at
        once, over a fresh gloo group: it sends to each of ``sends`` and receives from each of ``receives``
        concurrently (best of ``repeats``)."""
        rank = members.index(self.id)
        pg = meshlib.standalone_group(self._store(), group, rank, len(members), self.cfg.runtime.collective_timeout_s)
        out = [torch.ones(nbytes // 4, dtype=torch.float32) for _ in sends]
        into = [torch.empty(nbytes // 4, dtype=torch.float32) for _ in receives]
        best = float("inf")
        try:
            for r in range(repeats):
                started = time.perf_counter()
                work = [pg.send([buf], members.index(dst), r) for buf, dst in zip(out, sends, strict=True)]
                work += [pg.recv([buf], members.index(src), r) for buf, src in zip(into, receives, strict=True)]
                for w in work:
                    w.wait()
                best = min(best, time.perf_counter() - started)
        finally:
            del pg
            meshlib.close_standalone(group)
        return best

    @COMPUTE
    def memcpy_seconds(self, nbytes: int, repeats: int = 3) -> float:
        """Seconds to copy ``nbytes`` between two fresh buffers in this process (best of ``repeats``)."""
        src, dst = torch.ones(nbytes // 4, dtype=torch.float32), torch.empty(nbytes // 4, dtype=torch.float32)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - started)
        return best

    @COMPUTE
    def shutdown(self) -> None:
        self.release()
        ray.actor.exit_actor()
