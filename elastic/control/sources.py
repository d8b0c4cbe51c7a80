"""Sources of events, polled by the controller between steps (never during one).

- ``ScriptedEvents``: events at given steps (tests, benchmarks, the demo);
- ``ClusterWatcher``: Ray's cluster view; a node or CPUs appearing or leaving changes the worker
  budget the cluster can hold.

The control plane's inbox (operator requests) and the workload's phase changes reach the controller
through its ``Inbox`` too. Worker deaths come from no source: a failed call reports them
(``WorkerFailure``).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Protocol

from elastic.control.events import Event, SetBudget

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

        cpus = ray.cluster_resources().get("CPU", 0.0) - self.reserved_cpus
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
