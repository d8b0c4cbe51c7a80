"""Which workers the job has: actor handles, ids, warm-up, the node each runs on, spares and replacements.

This is the only module that creates worker actors (an import contract: nothing else imports the actor
class). A worker gets a stable integer id for its life; it is *starting* while it warms up in the
background (torch imported, FSDP and DTensor code paths run once) and *warm* after that. ``live`` is every
process still alive, warm or not. Losing a worker (its call failed as dead, or the driver stopped it)
removes it here; nothing else keeps actor handles.

Workers are spread over the cluster's nodes (Ray's SPREAD strategy), so that a node, the unit that fails
together, holds as few of them as possible; ``nodes`` says where each one runs. A warm-up that fails is
retried with a new worker at once (so it counts as starting), which waits a doubling backoff before it warms
up, ``warmup_retries`` times in all; ``start_failures`` keeps what went wrong, and ``gave_up`` says whether
the retries are spent.

Assumes ``ray.init`` has been called.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable

import ray
from ray.exceptions import RayError

from elastic.core.config import Config
from elastic.runtime.worker import Worker

log = logging.getLogger(__name__)
SPAWN_REPORT_S = 30.0  # while workers are not up, say so this often (with what they need and what is free)


class Membership:
    def __init__(self, cfg: Config, store_host: str, store_port: int) -> None:
        self.cfg, self.store_addr = cfg, (store_host, store_port)
        self.actors: dict[int, ray.actor.ActorHandle] = {}
        self.info: dict[int, dict] = {}  # id -> {"pid", "host", "node_id", "idle_rss"} once warm
        self._node_bytes: dict[str, int] = {}  # node -> its memory as Ray reports it (node_memory)
        self._starting: dict[int, ray.ObjectRef] = {}
        self._next_id = 0
        self._warm_kind: dict[int, tuple[dict | None, bool]] = {}  # id -> (resources, full warm-up)
        self.start_failures: list[str] = []
        self.gave_up = False

    # ---- starting ------------------------------------------------------------------------
    def start(self, n: int, resources: dict | None = None, warm: bool = True, delay_s: float = 0.0) -> list[int]:
        """Start ``n`` workers in the background; returns their ids (they warm up while training goes on).
        ``warm=False`` waits only for the processes and their imports, as a restarted torchrun worker would.
        ``delay_s``: each worker waits that long before warming up (a retry's backoff)."""
        ids = list(range(self._next_id, self._next_id + n))
        self._next_id += n
        for wid in ids:
            actor = Worker.options(num_cpus=self.cfg.runtime.cpus_per_worker, max_restarts=0, resources=resources or {},
                                   scheduling_strategy="SPREAD").remote(wid, self.cfg, *self.store_addr)
            self.actors[wid] = actor
            self._starting[wid] = actor.warmup.remote(warm, delay_s)
            self._warm_kind[wid] = (resources, warm)
        return ids

    def spawn(self, n: int, resources: dict | None = None, warm: bool = True) -> list[int]:
        """Start ``n`` workers and wait until each is warm; returns the ids of those that came up (a worker that
        dies while starting is dropped and logged: the controller starts another when it plans)."""
        ids = self.start(n, resources, warm)
        waited, limit = 0.0, self.cfg.runtime.store_timeout_s * 4
        while waited < limit:
            refs = [self._starting[w] for w in ids if w in self._starting]
            done, pending = ray.wait(refs, num_returns=len(refs), timeout=SPAWN_REPORT_S)
            waited += SPAWN_REPORT_S
            if not pending:
                break
            free = ray.available_resources().get("CPU", 0.0)
            log.warning("%d of %d workers are not up after %.0f s: Ray has not placed or started them (each needs "
                        "runtime.cpus_per_worker=%g CPU; %.2f CPU are free in the cluster)", len(pending), n, waited,
                        self.cfg.runtime.cpus_per_worker, free)
        return [w for w in ids if self._warmed(w)]

    def take_warmed(self) -> list[int]:
        """Workers that finished warming up since the last call (non-blocking); they count as warm from now."""
        return [wid for wid in sorted(self._starting) if self._warmed(wid)]

    def _warmed(self, wid: int) -> bool:
        """Whether starting worker ``wid`` finished warming up (non-blocking); one that failed is dropped."""
        ref = self._starting[wid]
        finished, _ = ray.wait([ref], timeout=0)
        if not finished:
            return False
        del self._starting[wid]
        resources, warm = self._warm_kind.pop(wid)
        try:
            self.info[wid] = ray.get(ref)
            return True
        except RayError as err:
            self.actors.pop(wid, None)
            self._failed_start(wid, str(err).strip().splitlines()[0][:300], resources, warm)
            return False

    def _failed_start(self, wid: int, why: str, resources: dict | None, warm: bool) -> None:
        """Count a failed warm-up and schedule another worker after a doubling backoff, while retries are left."""
        self.start_failures.append(f"worker {wid}: {why}")
        tries = len(self.start_failures)
        if tries > self.cfg.runtime.warmup_retries:
            self.gave_up = True
            log.warning("worker %d failed to start (%s); %d warm-ups failed, no more retries", wid, why, tries)
            return
        backoff = self.cfg.runtime.warmup_backoff_s * 2 ** (tries - 1)
        log.warning("worker %d failed to start (%s); another one warms up in %.0f s", wid, why, backoff)
        self.start(1, resources, warm, delay_s=backoff)

    def wait_warm(self, timeout_s: float) -> None:
        """Block until no worker is warming up (or the timeout passes)."""
        if self._starting:
            ray.wait(list(self._starting.values()), num_returns=len(self._starting), timeout=timeout_s)

    def cancel_starting(self, count: int) -> list[int]:
        """Stop up to ``count`` workers that are still starting (newest first); returns their ids."""
        victims = sorted(self._starting, reverse=True)[:count]
        for wid in victims:
            del self._starting[wid]
        self.remove(victims)
        return victims

    # ---- who is there -----------------------------------------------------------------------
    @property
    def starting(self) -> list[int]:
        """Workers warming up (retries of failed warm-ups included)."""
        return sorted(self._starting)

    def warm(self) -> list[int]:
        """Workers that are up and warm."""
        return sorted(w for w in self.actors if w not in self._starting)

    def live(self) -> frozenset[int]:
        """Every worker process still alive, warm or warming."""
        return frozenset(self.actors)

    def handle(self, worker: int) -> ray.actor.ActorHandle:
        return self.actors[worker]

    def pid(self, worker: int) -> int:
        return self.info[worker]["pid"]

    def nodes(self) -> dict[int, str]:
        """worker -> the id of the Ray node it runs on (warm workers)."""
        return {w: self.info[w]["node_id"] for w in self.actors if w in self.info}

    def idle_bytes(self) -> dict[int, int]:
        """worker -> its resident bytes after warm-up, before any model (warm workers that reported it)."""
        return {w: self.info[w]["idle_rss"] for w in self.actors if self.info.get(w, {}).get("idle_rss")}

    def node_memory(self) -> dict[str, int]:
        """node -> the bytes Ray found available there when the node started (its ``memory`` resource for tasks
        and actors plus its object store's share), for the nodes of live workers. A node's size is fixed, so
        the GCS is asked only when a worker runs on a node not seen before (the policy asks before every
        decision, and for every fallback)."""
        mine = {self.info[w]["node_id"] for w in self.actors if w in self.info}
        if not mine <= self._node_bytes.keys():
            try:
                nodes = ray.nodes()
            except RayError as err:  # the GCS is busy (a node loss): no budget this time, asked again next time
                log.warning("could not read the nodes' memory from Ray (%s); memory limits nothing this time", err)
                nodes = []
            for n in nodes:
                if n.get("Alive"):
                    resources = n.get("Resources", {})
                    self._node_bytes[n["NodeID"]] = int(resources.get("memory", 0)
                                                        + resources.get("object_store_memory", 0))
        return {node: self._node_bytes[node] for node in mine if node in self._node_bytes}

    def dead_nodes(self, workers: Iterable[int]) -> set[str]:
        """The nodes of ``workers`` that Ray's GCS no longer reports alive."""
        mine = {self.info[w]["node_id"] for w in workers if w in self.info}
        if not mine:
            return set()
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        return mine - alive

    # ---- leaving ----------------------------------------------------------------------------
    def lost(self, workers: Iterable[int]) -> None:
        """Forget workers whose processes are gone (a failed call found them dead)."""
        for wid in workers:
            self.actors.pop(wid, None)
            self._starting.pop(wid, None)

    def remove(self, workers: Iterable[int]) -> None:
        """Stop actors and forget them (no state is read from them)."""
        for wid in list(workers):
            actor = self.actors.pop(wid, None)
            self.info.pop(wid, None)
            self._starting.pop(wid, None)
            if actor is not None:
                ray.kill(actor, no_restart=True)

    def kill(self, worker: int) -> None:
        """SIGKILL a worker's process from outside, as a crash would (chaos tests, benchmarks, the demo)."""
        os.kill(self.pid(worker), signal.SIGKILL)

    def kill_hung(self, worker: int) -> None:
        """Stop a worker the driver declared hung (through Ray, wherever it runs); its pending calls then fail
        as a death does. It stays in ``actors`` until a failed call reports it (``lost``)."""
        actor = self.actors.get(worker)
        if actor is not None:
            ray.kill(actor, no_restart=True)


class MembershipView:
    """The ``WorkerGroup`` protocol's membership methods, answered by ``self.members`` (a ``Membership``)."""

    members: Membership

    @property
    def starting(self) -> list[int]:
        return self.members.starting

    def spawn(self, n: int, resources: dict | None = None, warm: bool = True) -> list[int]:
        return self.members.spawn(n, resources, warm)

    def start(self, n: int, resources: dict | None = None, warm: bool = True, delay_s: float = 0.0) -> list[int]:
        return self.members.start(n, resources, warm)

    def take_warmed(self) -> list[int]:
        return self.members.take_warmed()

    def wait_warm(self, timeout_s: float) -> None:
        self.members.wait_warm(timeout_s)

    def cancel_starting(self, count: int) -> list[int]:
        return self.members.cancel_starting(count)

    def start_trouble(self) -> str | None:
        m = self.members
        if not m.gave_up:
            return None
        return f"{len(m.start_failures)} worker warm-ups failed; the last: {m.start_failures[-1]}"

    def warm(self) -> list[int]:
        return self.members.warm()

    def live(self) -> frozenset[int]:
        return self.members.live()

    def nodes(self) -> dict[int, str]:
        return self.members.nodes()

    def node_memory(self) -> dict[str, int]:
        return self.members.node_memory()

    def idle_bytes(self) -> dict[int, int]:
        return self.members.idle_bytes()

    def remove(self, workers: Iterable[int]) -> None:
        self.members.remove(workers)

    def kill(self, worker: int) -> None:
        self.members.kill(worker)

    def pid(self, worker: int) -> int:
        return self.members.pid(worker)

    def handle(self, worker: int) -> ray.actor.ActorHandle:
        return self.members.handle(worker)
