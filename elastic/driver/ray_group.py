"""RayWorkerGroup: the ``WorkerGroup`` protocol on Ray actors, one OS process per worker.

It starts actors (fractional CPUs), hosts the TCPStore that every gloo group rendezvous through (it
outlives any worker), forms a placement's group, runs tasks and fails fast: the first worker that
dies or fails makes the group abort every other member, so survivors blocked in a collective are
released at once, and the call raises ``WorkerFailure`` naming the worker that caused it. This is
the only module that holds actor handles.

Assumes ``ray.init`` has been called by the caller.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist
from ray.exceptions import GetTimeoutError, OutOfMemoryError, RayActorError, RayError, RayTaskError

from elastic.core.config import Config
from elastic.core.layout import Placement
from elastic.driver.group import Snapshot, WorkerFailure
from elastic.model.specs import training_specs
from elastic.plan.memory_rounds import TransferWork
from elastic.runtime.engine import StepResult
from elastic.runtime.tasks import TrainStep, WorkerTask
from elastic.runtime.worker import StepFailed, Worker

log = logging.getLogger(__name__)
REABORT_EVERY_S = 1.0  # how often a failing gather cuts the gloo groups of members that have not answered


class RayWorkerGroup:
    def __init__(self, cfg: Config, run_id: str | None = None) -> None:
        self.cfg = cfg
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.host = ray.util.get_node_ip_address()
        self.store = dist.TCPStore(self.host, 0, is_master=True, wait_for_workers=False, use_libuv=True,
                                   timeout=datetime.timedelta(seconds=cfg.runtime.store_timeout_s))
        self._actors: dict[int, ray.actor.ActorHandle] = {}
        self._info: dict[int, dict] = {}
        self._placement: Placement | None = None
        self._committed = 0
        self._next_id = 0
        self._generation = 0
        self._starting: dict[int, ray.ObjectRef] = {}
        self._preparing: dict[str, tuple[Placement, dict[int, ray.ObjectRef]]] = {}  # group name -> skeleton builds
        self._queued: list[Placement] = []  # builds waiting for the one in flight
        self._commit_skeleton: str | None = None  # the skeleton every member of the transfer's target holds

    @property
    def placement(self) -> Placement | None:
        return self._placement

    @property
    def committed(self) -> int:
        """Optimizer steps every rank has computed; their updates are applied or about to be."""
        return self._committed

    # ---- membership ----------------------------------------------------------------------
    def spawn(self, n: int, resources: dict | None = None, warm: bool = True) -> list[int]:
        """Start ``n`` workers and wait until each is warm; returns the ids of those that came up (a worker that
        dies while starting is dropped and logged: the controller starts another when it plans).
        ``warm=False`` waits only for the processes and their imports, as a restarted torchrun worker would."""
        ids = self.start(n, resources, warm)
        refs = [self._starting[w] for w in ids]
        ray.wait(refs, num_returns=len(refs), timeout=self.cfg.runtime.store_timeout_s * 4)
        return [w for w in ids if self._warmed(w)]

    def start(self, n: int, resources: dict | None = None, warm: bool = True) -> list[int]:
        ids = list(range(self._next_id, self._next_id + n))
        self._next_id += n
        for wid in ids:
            self._actors[wid] = Worker.options(
                num_cpus=self.cfg.runtime.cpus_per_worker, max_restarts=0, resources=resources or {},
            ).remote(wid, self.cfg, self.host, self.store.port)
            actor = self._actors[wid]
            self._starting[wid] = actor.warmup.remote() if warm else actor.started.remote()
        return ids

    def ready(self) -> list[int]:
        return [wid for wid in sorted(self._starting) if self._warmed(wid)]

    def _warmed(self, wid: int) -> bool:
        """Whether starting worker ``wid`` finished warming up (non-blocking); one that failed is dropped."""
        ref = self._starting[wid]
        finished, _ = ray.wait([ref], timeout=0)
        if not finished:
            return False
        del self._starting[wid]
        try:
            self._info[wid] = ray.get(ref)
            return True
        except RayError as err:
            log.warning("worker %d failed to start: %s", wid, str(err).splitlines()[0])
            self._actors.pop(wid, None)
            return False

    def wait_ready(self, timeout_s: float) -> None:
        if self._starting:
            ray.wait(list(self._starting.values()), num_returns=len(self._starting), timeout=timeout_s)

    def cancel_starting(self, count: int) -> list[int]:
        """Stop up to ``count`` workers that are still starting (newest first); returns their ids."""
        victims = sorted(self._starting, reverse=True)[:count]
        for wid in victims:
            del self._starting[wid]
        self.remove(victims)
        return victims

    @property
    def starting(self) -> list[int]:
        return sorted(self._starting)

    def alive(self) -> list[int]:
        return sorted(w for w in self._actors if w not in self._starting)

    def live(self) -> frozenset[int]:
        return frozenset(self._actors)

    def cluster_cpus(self) -> float:
        return ray.cluster_resources().get("CPU", 2.0)

    def ping(self, workers: Iterable[int]) -> dict[int, dict]:
        """Each worker's identity (id, pid, host, node), asked now: a check that the workers still answer."""
        workers = list(workers)
        return self._gather({w: self._actors[w].info.remote() for w in workers}, members=workers)

    def pid(self, worker: int) -> int:
        return self._info[worker]["pid"]

    def kill(self, worker: int) -> None:
        """SIGKILL a worker's process from outside (chaos tests, benchmarks)."""
        os.kill(self.pid(worker), signal.SIGKILL)

    def handle(self, worker: int) -> ray.actor.ActorHandle:
        """The actor of ``worker`` (tests check that every handle is gone after a shutdown)."""
        return self._actors[worker]

    def remove(self, workers: Iterable[int]) -> None:
        """Stop actors and forget them (no state is read from them)."""
        for wid in list(workers):
            actor = self._actors.pop(wid, None)
            self._info.pop(wid, None)
            if actor is not None:
                ray.kill(actor, no_restart=True)

    def shutdown(self) -> None:
        self.remove(list(self._actors))
        self._placement = None

    # ---- training ------------------------------------------------------------------------
    def next_group_name(self) -> str:
        self._generation += 1
        return f"{self.run_id}/g{self._generation}"

    def setup(self, placement: Placement, step: int = 0, empty: bool = False) -> float:
        missing = [w for w in placement.workers if w not in self._actors]
        if missing:
            raise ValueError(f"placement {placement} names workers {missing} that this group does not have")
        self._settle_prepares()
        name = self.next_group_name()
        calls = {w: self._actors[w].setup.remote(placement, name, None, step, self.cfg, empty)
                 for w in placement.workers}
        times = self._gather(calls, members=placement.workers, forming=name)
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
        calls = {w: self._actors[w].run_task.remote(self._committed, (tasks or {}).get(w, default))
                 for w in placement.workers}
        results = self._gather(calls, members=placement.workers)
        self._committed += 1
        self._pump()
        try:
            self._gather({w: self._actors[w].sync.remote(self._committed) for w in placement.workers},
                         members=placement.workers)
        except WorkerFailure as failure:
            failure.step_results = results
            raise
        return results

    def run(self, tasks: Mapping[int, WorkerTask]) -> dict[int, Any]:
        return self._gather({w: self._actors[w].run_task.remote(self._committed, task) for w, task in tasks.items()},
                            members=list(tasks))

    def settle(self, workers: Iterable[int]) -> None:
        workers = [w for w in workers if w in self._actors]
        self._gather({w: self._actors[w].sync.remote(self._committed) for w in workers}, members=workers)

    def _require_placement(self) -> Placement:
        if self._placement is None:
            raise RuntimeError("no placement formed yet; call setup() first")
        return self._placement

    # ---- skeletons built ahead (see runtime/skeletons.py) ----------------------------------------
    def prepare(self, placements: Iterable[Placement]) -> None:
        """Have each placement's workers build its engine skeleton and form its groups in the background, while
        training goes on; returns at once. Placements already asked for are not built twice.

        One build runs at a time, the next sent when the driver next looks (``prepared``, a step): Ray does not
        keep the order of calls to a threaded actor, and two builds whose members started them in different
        orders would wait on each other's rendezvous."""
        fresh = [p for p in dict.fromkeys(placements)
                 if p not in self._queued and not any(p == q for q, _ in self._preparing.values())]
        self._queued[0:0] = fresh  # the newest ask first: a planned move goes before the fallbacks asked earlier
        self._pump()

    @staticmethod
    def _finished(refs: dict[int, ray.ObjectRef]) -> bool:
        done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=0)
        return len(done) == len(refs)

    def _pump(self) -> None:
        """Send the next queued build once the one in flight (if any) has finished."""
        for name, (_, refs) in self._preparing.items():
            if not self._finished(refs):
                if any(w not in self._actors for w in refs):  # a member is gone: call the rendezvous off
                    self.store.set(f"{name}/abort", "1")
                return
        while self._queued:
            placement = self._queued.pop(0)
            if any(w not in self._actors or w in self._starting for w in placement.workers):
                continue
            name = self.next_group_name()
            self._preparing[name] = (placement, {w: self._actors[w].prepare.remote(placement, name)
                                                 for w in placement.workers})
            return

    def prepared(self, placement: Placement) -> bool:
        """Whether no skeleton build of ``placement`` is queued or still running (done, failed or never asked)."""
        self._pump()
        if placement in self._queued:
            return False
        return all(self._finished(refs) for p, refs in self._preparing.values() if p == placement)

    def skeletons(self, workers: Iterable[int]) -> dict[int, list[Placement]]:
        """The placements each worker holds engine skeletons of."""
        workers = list(workers)
        return self._gather({w: self._actors[w].skeleton_placements.remote() for w in workers}, members=workers)

    def drop_skeletons(self, workers: Iterable[int]) -> None:
        """Have ``workers`` drop every skeleton they hold (a benchmark's rebuild-on-the-stall baseline)."""
        self._settle_prepares()
        workers = list(workers)
        self._gather({w: self._actors[w].drop_skeletons.remote() for w in workers}, members=workers)

    def _settle_prepares(self) -> None:
        """Wait for the skeleton builds still running (a group-forming call must not overlap them: a worker forms
        one group set at a time). A build whose member died is called off; a failed one only means that its
        placement will be built when it is used."""
        lost = {}
        self._queued.clear()  # builds not started yet are dropped: the placement they were for may not happen
        for name, (placement, refs) in list(self._preparing.items()):
            if any(w not in self._actors for w in placement.workers):
                self.store.set(f"{name}/abort", "1")
            present = {w: ref for w, ref in refs.items() if w in self._actors}  # not the ones removed on purpose
            try:
                self._gather(present, members=list(present), abort=False)
            except WorkerFailure as failure:
                log.info("skeleton of %s not built: %s", placement.layout, failure)
                lost.update(failure.dead)
            del self._preparing[name]
        if lost:  # a worker died meanwhile: the caller must hear of it (a failed build alone is no loss)
            raise WorkerFailure(lost, {})

    def _forget_lost(self, dead: Iterable[int]) -> None:
        """Call off skeleton builds that need a lost worker, and have the others drop skeletons naming it."""
        dead = set(dead)
        for name, (placement, _) in self._preparing.items():
            if dead & set(placement.workers):
                self.store.set(f"{name}/abort", "1")
        for w in self._actors:
            if w not in dead:
                self._actors[w].forget_workers.remote(sorted(dead))

    # ---- live reshard ----------------------------------------------------------------------
    def transfer(self, new: Placement, work: TransferWork, step: int) -> dict[int, dict]:
        self._settle_prepares()
        old = self._placement
        participants = sorted(set(new.workers) | set(work.movers))
        name = self.next_group_name()
        calls = {w: self._actors[w].transfer.remote(old, new, work.of(w), work.movers if w in work.movers else (),
                                                    name, step) for w in participants}
        # On a failure only the transfer group is cut: the old engines and their groups stay intact.
        stats = self._gather(calls, members=participants, cut_group=name, forming=name)
        # The commit binds skeletons only if every member of ``new`` holds the same group set's.
        names = {stats[w].get("skeleton") for w in new.workers}
        self._commit_skeleton = names.pop() if len(names) == 1 else None
        return stats

    def cancel_transfer(self, workers: Iterable[int]) -> None:
        for w in workers:
            if w in self._actors:
                self._actors[w].cancel_transfer.remote()

    def commit(self, new: Placement) -> dict[int, dict]:
        # From here on the new placement's shards exist on its workers (staged): if a commit fails, the
        # job recovers from the new placement, not the old one.
        self._placement = new
        name = self.next_group_name()
        skeleton, self._commit_skeleton = self._commit_skeleton, None
        return self._gather({w: self._actors[w].commit.remote(name, skeleton) for w in new.workers},
                            members=new.workers, forming=name)

    def release(self, workers: Iterable[int], wait: bool = True) -> None:
        workers = list(workers)
        if self._placement is not None and set(self._placement.workers) <= set(workers):
            self._placement, self._committed = None, 0  # nobody holds the placement any more
        refs = {w: self._actors[w].release.remote() for w in workers if w in self._actors}
        if wait:
            self._gather(refs, members=list(refs))

    # ---- snapshots ----------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """Copy every rank's shards now (the stall); the copies travel to the object store in the background,
        owned by this driver, so a snapshot outlives the worker it came from."""
        placement = self._require_placement()
        started = time.perf_counter()
        sizes = self._gather({w: self._actors[w].snapshot_copy.remote(self._committed) for w in placement.workers},
                             members=placement.workers)
        stall = time.perf_counter() - started
        refs = {w: self._actors[w].snapshot_take.remote() for w in placement.workers}
        return Snapshot(self._committed, placement, refs, sum(sizes.values()), stall)

    def snapshot_status(self, snap: Snapshot, wait_s: float = 0.0) -> bool | None:
        ready, pending = ray.wait(list(snap.parts.values()), num_returns=len(snap.parts), timeout=wait_s)
        if pending:
            return False
        try:
            ray.get(ready)
        except Exception as err:  # a worker died before handing its part over
            text = str(err).strip()
            log.warning("snapshot at step %d is incomplete (%s)", snap.step,
                        text.splitlines()[0] if text else type(err).__name__)
            return None
        return True

    def restore(self, snap: Snapshot, new: Placement) -> None:
        self._settle_prepares()
        name = self.next_group_name()
        sources = {w: [ref] for w, ref in snap.parts.items()}
        self._gather({w: self._actors[w].restore.remote(new, name, snap.placement, sources, snap.step, self.cfg)
                      for w in new.workers}, members=new.workers, forming=name)
        self._placement, self._committed = new, snap.step

    # ---- checkpoints and inspection ------------------------------------------------------------
    def write_shards(self, folder: Path, entries: dict[int, list]) -> dict[int, dict]:
        calls = {w: self._actors[w].save_shard.remote(str(folder), items, self._committed)
                 for w, items in entries.items() if items}
        return self._gather(calls, members=list(calls))

    def load_checkpoint(self, folder: Path, placement: Placement, step: int) -> None:
        self._settle_prepares()
        name = self.next_group_name()
        self._gather({w: self._actors[w].load_checkpoint.remote(placement, name, str(folder), self.cfg)
                      for w in placement.workers}, members=placement.workers, forming=name)
        self._placement, self._committed = placement, step

    def gather_tensors(self) -> tuple[int, dict[str, torch.Tensor]]:
        placement = self._require_placement()
        held = self._gather({w: self._actors[w].local_tensors.remote(self._committed) for w in placement.workers},
                            members=placement.workers)
        steps = {step for step, _ in held.values()}
        if len(steps) != 1:
            raise RuntimeError(f"workers disagree on the step: {steps}")
        n_layers = self.cfg.model.n_layers
        full = {}
        for spec in training_specs(self.cfg):
            out = None
            for rank, wid in enumerate(placement.workers):
                local = held[wid][1].get(spec.name)
                if local is None:
                    continue
                box = placement.box(spec, rank, n_layers)
                out = torch.empty(spec.shape, dtype=local.dtype) if out is None else out
                out[tuple(slice(lo, hi) for lo, hi in box)] = local
            if out is None:
                raise RuntimeError(f"no worker holds {spec.name}")
            full[spec.name] = out
        return steps.pop(), full

    # ---- measurement (benchmarks) --------------------------------------------------------------
    def memory(self, workers: Iterable[int], reset_peak: bool = False) -> dict[int, dict[str, int]]:
        """Resident and peak resident bytes of each worker's process."""
        workers = list(workers)
        return self._gather({w: self._actors[w].memory.remote(reset_peak) for w in workers}, members=workers)

    def probe_flows(self, pairs: Iterable[tuple[int, int]], nbytes: int) -> float:
        """Bytes/s per worker link when every (sender, receiver) pair sends ``nbytes`` at the same time: the
        busiest worker's bytes in or out over the probe's duration (gloo over loopback here)."""
        pairs = sorted(set(pairs))
        members = tuple(sorted({w for pair in pairs for w in pair}))
        self._settle_prepares()
        name = self.next_group_name()
        calls = {w: self._actors[w].probe_flows.remote(name, members, tuple(d for s, d in pairs if s == w),
                                                       tuple(s for s, d in pairs if d == w), nbytes)
                 for w in members}
        seconds = max(self._gather(calls, members=members, forming=name).values())
        busiest = max(max(sum(s == w for s, _ in pairs), sum(d == w for _, d in pairs)) for w in members)
        return busiest * nbytes / seconds

    def memcpy_rate(self, workers: Iterable[int], nbytes: int) -> float:
        """Bytes/s of a local copy when ``workers`` all copy ``nbytes`` at once (the slowest one's rate)."""
        workers = list(workers)
        seconds = self._gather({w: self._actors[w].memcpy_seconds.remote(nbytes) for w in workers}, members=workers)
        return nbytes / max(seconds.values())

    # ---- fail-fast gathering ---------------------------------------------------------------------
    def _abort(self, workers: Iterable[int]) -> None:
        for wid in workers:
            if wid in self._actors:
                self._actors[wid].abort.remote()

    def _cut(self, workers: Iterable[int], cut_group: str | None) -> None:
        """Abort ``workers``' gloo groups (only ``cut_group`` if given: a reshard's transfer group)."""
        if cut_group is None:
            self._abort(workers)
        else:
            for w in workers:
                if w in self._actors:
                    self._actors[w].cut_group.remote(cut_group)

    def _gather(self, calls: dict[int, ray.ObjectRef], members: Iterable[int] = (), abort: bool = True,
                timeout: float | None = None, cut_group: str | None = None,
                forming: str | None = None) -> dict[int, Any]:
        """Wait for every call; on the first failure abort the other members so nobody stays blocked."""
        timeout = timeout or self.cfg.runtime.collective_timeout_s * 2 + 30
        deadline = time.monotonic() + timeout
        pending = {ref: w for w, ref in calls.items()}
        results, dead, failed, details = {}, {}, {}, {}
        aborted = False
        while pending:
            left = deadline - time.monotonic()
            # Once aborting, re-send the abort every second: a member that entered a collective after
            # the first cut may have opened fresh gloo connections that the first cut did not see.
            wait = min(left, REABORT_EVERY_S) if aborted else left
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, wait))
            if not ready:
                waiting = sorted(pending.values())
                if aborted and left > REABORT_EVERY_S:
                    self._cut(waiting, cut_group)
                    continue
                self._abort(waiting)
                raise WorkerFailure({}, {w: f"no answer within {timeout:.0f} s" for w in waiting})
            ref = ready[0]
            wid = pending.pop(ref)
            try:
                results[wid] = ray.get(ref)
            except (RayActorError, OutOfMemoryError) as err:  # Ray's memory monitor kills the process
                dead[wid] = f"process died ({type(err).__name__})"
            except RayTaskError as err:
                cause = err.cause if isinstance(err.cause, Exception) else err
                if isinstance(cause, StepFailed):
                    failed[wid], details[wid] = str(cause), cause.detail
                else:
                    failed[wid], details[wid] = f"{type(cause).__name__}: {cause}", str(err)
            except GetTimeoutError:
                failed[wid] = "timed out"
            except RayError as err:
                failed[wid] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            if (dead or failed) and abort and not aborted:
                aborted = True
                if forming is not None:  # release peers still waiting in the group's rendezvous
                    self.store.set(f"{forming}/abort", "1")
                self._cut([w for w in members if w not in dead and w in self._actors], cut_group)
        for wid in dead:
            self._actors.pop(wid, None)
        if dead:
            self._forget_lost(dead)
        if dead or failed:
            raise WorkerFailure(dead, failed, details)
        return results
