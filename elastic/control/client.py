"""Talk to a running job from anywhere on its Ray cluster: ``JobClient("myjob").relayout("dp=2,tp=2")``.

The ``elastic events`` CLI uses this. It imports ray and this package's light modules only (no
torch), so a call answers in about a second plus Ray's connection.
"""

from __future__ import annotations

import ray

from elastic.control.control_plane import NAMESPACE, actor_name
from elastic.control.events import AddWorkers, Drain, Event, Pause, Relayout, Resume, SetBudget, Stop
from elastic.core.layout import Layout


class JobClient:
    def __init__(self, job: str, timeout_s: float = 120.0) -> None:
        try:
            self.actor = ray.get_actor(actor_name(job), namespace=NAMESPACE)
        except ValueError:
            raise ValueError(f"no running elastic job named {job!r} on this Ray cluster "
                             "(check the name, or --address)") from None
        self.timeout_s = timeout_s

    def _ask(self, event: Event) -> str:
        return ray.get(self.actor.request.remote(event, self.timeout_s))

    def status(self) -> dict:
        return ray.get(self.actor.get_status.remote())

    def relayout(self, layout: str | Layout) -> str:
        layout = Layout.parse(layout) if isinstance(layout, str) else layout
        return self._ask(Relayout(reason=f"operator relayout to {layout}", layout=layout))

    def set_workers(self, workers: int) -> str:
        return self._ask(SetBudget(reason=f"operator budget {workers} workers", workers=workers))

    def add_workers(self, count: int) -> str:
        return self._ask(AddWorkers(reason=f"operator adds {count} workers", count=count))

    def drain(self, worker: int) -> str:
        return self._ask(Drain(reason=f"operator drains worker {worker}", worker=worker))

    def pause(self) -> str:
        return self._ask(Pause(reason="operator pause"))

    def resume(self) -> str:
        return self._ask(Resume(reason="operator resume"))

    def stop(self) -> str:
        return self._ask(Stop(reason="operator stop"))
