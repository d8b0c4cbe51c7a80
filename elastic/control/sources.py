"""Sources of events, polled by the controller between steps (never during one).

- ``ScriptedEvents``: events at given steps (tests, benchmarks, the demo);
- ``ClusterWatcher``: Ray's cluster view; a node or CPUs appearing or leaving changes the worker
  budget the cluster can hold (a node Ray is draining no longer counts);
- ``DrainWatcher``: Ray's preemption notices; each worker on a node the cluster drains gets one ``Drain``,
  so its shards move off live before the node goes.

The control plane's inbox (operator requests) and the workload's phase changes reach the controller
through its ``Inbox`` too. Worker deaths come from no source: a failed call reports them
(``WorkerFailure``).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Protocol

from elastic.control.events import Drain, Event, SetBudget

log = logging.getLogger(__name__)


class EventSource(Protocol):
    def poll(self, step: int) -> list[Event]: ...


class ScriptedEvents:
    """Events to deliver when the job reaches given steps: ``{step: [event, ...]}``."""

    def __init__(self, script: dict[int, list[Event]]) -> None:
        self.script = {step: list(events) for step, events in script.items()}

    def poll(self, step: int) -> list[Event]:
        due = [s for s in self.script if s <= step]
        return [event for s in sorted(due) for event in self.script.pop(s)]


class ClusterWatcher:
    """Turns Ray's cluster view into a worker budget: total CPUs / CPUs per worker, capped."""

    def __init__(self, cpus_per_worker: float, max_workers: int, interval_s: float = 1.0,
                 reserved_cpus: float = 0.0) -> None:
        self.cpus_per_worker, self.max_workers = cpus_per_worker, max_workers
        self.interval_s, self.reserved_cpus = interval_s, reserved_cpus
        self.last_budget: int | None = None
        self._next = 0.0

    def capacity(self) -> int:
        import ray

        from elastic.driver.ray_compat import draining_nodes

        try:
            draining = draining_nodes()
        except Exception:  # noqa: BLE001 - a Ray without the private call: count every live node (DrainWatcher warns)
            draining = {}
        nodes = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] not in draining]
        cpus = sum(n.get("Resources", {}).get("CPU", 0.0) for n in nodes) - self.reserved_cpus
        return max(0, min(self.max_workers, math.floor(cpus / self.cpus_per_worker + 1e-9)))

    def poll(self, step: int) -> list[Event]:
        now = time.monotonic()
        if now < self._next:
            return []
        self._next = now + self.interval_s
        budget = self.capacity()
        if budget == self.last_budget:
            return []
        before, self.last_budget = self.last_budget, budget
        if before is None:
            return []  # the first reading sets the baseline; the job starts on what it was given
        log.info("cluster capacity changed: %s -> %d workers", before, budget)
        return [SetBudget(reason=f"cluster capacity {before} -> {budget} workers", workers=budget)]


class DrainWatcher:
    """Ray's preemption notices (``group.draining_nodes()``): one ``Drain`` per worker on a draining node.

    The drain runs at the next step boundary as any move does, so a notice longer than a step plus the move
    loses nothing; a node that goes before that is a node loss (replicas or the newest snapshot serve)."""

    def __init__(self, group, interval_s: float = 0.5) -> None:
        self.group, self.interval_s = group, interval_s
        self.noticed: set[int] = set()
        self._next = 0.0

    def poll(self, step: int) -> list[Event]:
        now = time.monotonic()
        if now < self._next:
            return []
        self._next = now + self.interval_s
        try:
            draining = self.group.draining_nodes()
        except Exception as err:  # noqa: BLE001 - a Ray without the private call must not end the job
            log.warning("cannot read Ray's node drain state (%s); preemption notices will not be seen", err)
            self._next = math.inf
            return []
        if not draining:
            return []
        events: list[Event] = []
        for worker, node in sorted(self.group.nodes().items()):
            if node in draining and worker not in self.noticed:
                self.noticed.add(worker)
                deadline = draining[node]
                left = f", {deadline - time.time():.0f} s before its deadline" if deadline else ", no deadline"
                events.append(Drain(reason=f"Ray drains node {node[:8]} (worker {worker}{left})", worker=worker,
                                    deadline=deadline))
        if events:
            log.info("%s", "; ".join(e.reason for e in events))
        return events
