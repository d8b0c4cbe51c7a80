"""WorkerGroup: the driver-side handle on the worker actors.

It starts actors (one OS process each, fractional CPUs), hosts the TCPStore that every gloo
group rendezvous through (it outlives any worker), forms a placement's group, runs steps and
fails fast: the first worker that dies or fails makes the group abort every other member, so
survivors blocked in a collective are released at once, and the call raises ``WorkerFailure``
naming the worker that caused it.

Assumes ``ray.init`` has been called by the caller.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import time
import uuid
from collections.abc import Iterable

import ray
import torch
import torch.distributed as dist
from ray.exceptions import GetTimeoutError, OutOfMemoryError, RayActorError, RayError, RayTaskError

from elastic.core.config import Config
from elastic.core.layout import Placement, TensorSpec
from elastic.runtime.engine import StepResult
from elastic.runtime.worker import StepFailed, Worker

log = logging.getLogger(__name__)
REABORT_EVERY_S = 1.0  # how often a failing gather cuts the gloo groups of members that have not answered


class WorkerFailure(RuntimeError):
    """Some workers died or failed. ``dead`` lists the processes that are gone."""

    def __init__(self, dead: dict[int, str], failed: dict[int, str]) -> None:
        self.dead, self.failed = dead, failed
        culprits = dead or failed
        detail = "; ".join(f"worker {w}: {why}" for w, why in sorted(culprits.items()))
        super().__init__(f"{'lost' if dead else 'failed'} worker(s) {sorted(culprits)}: {detail}")


class WorkerGroup:
    def __init__(self, cfg: Config, run_id: str | None = None) -> None:
        self.cfg = cfg
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.host = ray.util.get_node_ip_address()
        self.store = dist.TCPStore(self.host, 0, is_master=True, wait_for_workers=False, use_libuv=True,
                                   timeout=datetime.timedelta(seconds=cfg.runtime.store_timeout_s))
        self.actors: dict[int, ray.actor.ActorHandle] = {}
        self.info: dict[int, dict] = {}
        self.placement: Placement | None = None
        self._next_id = 0
        self._generation = 0
        self._starting: dict[int, ray.ObjectRef] = {}
        self.committed = 0  # optimizer steps every rank has computed; their updates may be applied

    # ---- actors -------------------------------------------------------------------------
    def spawn(self, n: int, resources: dict | None = None) -> list[int]:
        """Start ``n`` new worker actors and wait until each is warm. Returns their ids."""
        ids = self.start(n, resources)
        infos = self._gather(self._starting.copy(), abort=False, timeout=self.cfg.runtime.store_timeout_s * 4)
        self.info.update(infos)
        self._starting.clear()
        return ids

    def start(self, n: int, resources: dict | None = None) -> list[int]:
        """Start ``n`` workers without waiting: they import torch and warm up while training goes on."""
        ids = list(range(self._next_id, self._next_id + n))
        self._next_id += n
        for wid in ids:
            self.actors[wid] = Worker.options(
                num_cpus=self.cfg.runtime.cpus_per_worker, max_restarts=0, resources=resources or {},
            ).remote(wid, self.cfg, self.host, self.store.port)
            self._starting[wid] = self.actors[wid].warmup.remote()
        return ids

    def ready(self) -> list[int]:
        """Workers started by ``start`` that have finished warming up (non-blocking). Failed ones are dropped."""
        done = []
        for wid, ref in list(self._starting.items()):
            finished, _ = ray.wait([ref], timeout=0)
            if not finished:
                continue
            del self._starting[wid]
            try:
                self.info[wid] = ray.get(ref)
                done.append(wid)
            except RayError as err:
                log.warning("worker %d failed to start: %s", wid, str(err).splitlines()[0])
                self.actors.pop(wid, None)
        return done

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
        """Workers that are up and warm (not the ones still starting)."""
        return sorted(w for w in self.actors if w not in self._starting)

    def pid(self, worker: int) -> int:
        return self.info[worker]["pid"]

    def kill(self, worker: int) -> None:
        """SIGKILL a worker's process from outside (chaos tests, benchmarks)."""
        os.kill(self.pid(worker), signal.SIGKILL)

    def remove(self, workers: Iterable[int]) -> None:
        """Stop actors and forget them (no state is read from them)."""
        for wid in list(workers):
            actor = self.actors.pop(wid, None)
            self.info.pop(wid, None)
            if actor is not None:
                ray.kill(actor, no_restart=True)

    def shutdown(self) -> None:
        self.remove(list(self.actors))
        self.placement = None

    # ---- groups and steps ---------------------------------------------------------------
    def next_group_name(self) -> str:
        self._generation += 1
        return f"{self.run_id}/g{self._generation}"

    def setup(self, placement: Placement, states: dict[int, dict[str, torch.Tensor]] | None = None,
              step: int = 0) -> float:
        """Form ``placement``'s group and build every rank's engine. Returns the slowest setup time."""
        missing = [w for w in placement.workers if w not in self.actors]
        if missing:
            raise ValueError(f"placement {placement} names workers {missing} that this group does not have")
        name = self.next_group_name()
        calls = {w: self.actors[w].setup.remote(placement, name, (states or {}).get(w), step, self.cfg)
                 for w in placement.workers}
        times = self._gather(calls, members=placement.workers, forming=name)
        self.placement, self.committed = placement, step
        return max(t["total"] for t in times.values())

    def step(self) -> dict[int, StepResult]:
        """One optimizer step on every rank of the current placement.

        The step counts as committed only when every rank has computed it; then every rank applies
        the update. On a failure before the commit, survivors stay at the old step.
        """
        if self.placement is None:
            raise RuntimeError("no placement formed yet; call setup() first")
        return self.step_with("train_step", {w: (self.committed,) for w in self.placement.workers})

    def step_with(self, method: str, args: dict[int, tuple]) -> dict[int, StepResult]:
        """One optimizer step through ``method`` with per-worker arguments (committed as ``step``)."""
        results = self._gather({w: getattr(self.actors[w], method).remote(*args[w]) for w in self.placement.workers},
                               members=self.placement.workers)
        self.committed += 1
        # Every rank computed the step: now apply it everywhere, so the step's time includes its update
        # and whatever comes next (a reshard, a snapshot) starts from settled state.
        self._gather({w: self.actors[w].sync.remote(self.committed) for w in self.placement.workers},
                     members=self.placement.workers)
        return results

    def call(self, method: str, *args, workers: Iterable[int] | None = None, **kwargs) -> dict:
        """Call an actor method on some workers (default: the placement) and gather the results."""
        targets = list(workers if workers is not None else self.placement.workers)
        return self._gather({w: getattr(self.actors[w], method).remote(*args, **kwargs) for w in targets},
                            members=targets)

    def call_each(self, method: str, args: dict[int, tuple], cut_group: str | None = None,
                  forming: str | None = None) -> dict:
        """Call ``method`` on each worker in ``args`` with that worker's own arguments.

        On a failure the other callees are released: by cutting only the gloo group ``cut_group``
        when given (their engines stay intact), otherwise by a full abort.
        """
        return self._gather({w: getattr(self.actors[w], method).remote(*a) for w, a in args.items()},
                            members=list(args), cut_group=cut_group, forming=forming)

    def abort(self, workers: Iterable[int]) -> None:
        for wid in workers:
            if wid in self.actors:
                self.actors[wid].abort.remote()

    def _cut(self, workers: Iterable[int], cut_group: str | None) -> None:
        """Abort ``workers``' gloo groups (only ``cut_group`` if given: a reshard's transfer group)."""
        if cut_group is None:
            self.abort(workers)
        else:
            for w in workers:
                if w in self.actors:
                    self.actors[w].cut_group.remote(cut_group)

    def _gather(self, calls: dict[int, ray.ObjectRef], members: Iterable[int] = (), abort: bool = True,
                timeout: float | None = None, cut_group: str | None = None,
                forming: str | None = None) -> dict[int, object]:
        """Wait for every call; on the first failure abort the other members so nobody stays blocked."""
        timeout = timeout or self.cfg.runtime.collective_timeout_s * 2 + 30
        deadline = time.monotonic() + timeout
        pending = {ref: w for w, ref in calls.items()}
        results, dead, failed = {}, {}, {}
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
                self.abort(waiting)
                raise WorkerFailure({}, {w: f"no answer within {timeout:.0f} s" for w in waiting})
            ref = ready[0]
            wid = pending.pop(ref)
            try:
                results[wid] = ray.get(ref)
            except (RayActorError, OutOfMemoryError) as err:  # Ray's memory monitor kills the process
                dead[wid] = f"process died ({type(err).__name__})"
            except RayTaskError as err:
                cause = err.cause if isinstance(err.cause, Exception) else err
                failed[wid] = str(cause) if isinstance(cause, StepFailed) else f"{type(cause).__name__}: {cause}"
            except GetTimeoutError:
                failed[wid] = "timed out"
            except RayError as err:
                failed[wid] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            if (dead or failed) and abort and not aborted:
                aborted = True
                if forming is not None:  # release peers still waiting in the group's rendezvous
                    self.store.set(f"{forming}/abort", "1")
                self._cut([w for w in members if w not in dead and w in self.actors], cut_group)
        for wid in dead:
            self.actors.pop(wid, None)
        if dead or failed:
            raise WorkerFailure(dead, failed)
        return results

    # ---- state --------------------------------------------------------------------------
    def gather_full_state(self, specs: list[TensorSpec]) -> tuple[int, dict[str, torch.Tensor]]:
        """(step, full tensors) assembled on the driver from every rank's boxes (small models)."""
        placement = self.placement
        states = self.call("local_state", self.committed)
        steps = {step for step, _ in states.values()}
        if len(steps) != 1:
            raise RuntimeError(f"workers disagree on the step: {steps}")
        n_layers = self.cfg.model.n_layers
        full = {}
        for spec in specs:
            base = spec.name.split("::")[0]
            out = None
            for rank, wid in enumerate(placement.workers):
                local = states[wid][1].get(spec.name)
                if local is None:
                    continue
                box = placement.box(spec, rank, n_layers)
                out = torch.empty(spec.shape, dtype=local.dtype) if out is None else out
                out[tuple(slice(lo, hi) for lo, hi in box)] = local
            if out is None:
                raise RuntimeError(f"no worker holds {spec.name} (base {base})")
            full[spec.name] = out
        return steps.pop(), full
