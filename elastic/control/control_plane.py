"""The running job's named Ray actor: a mailbox for operator requests and a status board.

The controller loop runs in the job's driver; this small actor is how anything else reaches it.
``JobClient`` (and the ``elastic events`` CLI) submits an event and waits for the controller's
decision; the controller drains the inbox between steps, answers each request, and publishes
its status (layout, workers, step, last reshard) after every change.

Actor name: ``elastic:<job name>`` in the ``elastic`` namespace.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import ray

from elastic.control.events import AddWorkers, Drain, Event, Pause, Relayout, Resume, SetBudget, Stop
from elastic.core.layout import Layout

NAMESPACE = "elastic"


def actor_name(job: str) -> str:
    return f"elastic:{job}"


@ray.remote(num_cpus=0, max_restarts=0)
class ControlPlane:
    def __init__(self) -> None:
        self.inbox: list[Event] = []
        self.decisions: dict[int, str] = {}
        self.waiters: dict[int, asyncio.Event] = {}
        self.status: dict = {"state": "starting"}
        self.ids = itertools.count(1)

    async def request(self, event: Event, timeout_s: float = 120.0) -> str:
        """Queue ``event`` and wait for the controller's answer."""
        event_id = next(self.ids)
        object.__setattr__(event, "id", event_id)
        self.waiters[event_id] = asyncio.Event()
        self.inbox.append(event)
        try:
            await asyncio.wait_for(self.waiters[event_id].wait(), timeout_s)
        except TimeoutError:
            return f"no decision within {timeout_s:.0f} s (the job may be busy or stopping)"
        finally:
            self.waiters.pop(event_id, None)
        return self.decisions.pop(event_id)

    async def take_inbox(self) -> list[Event]:
        events, self.inbox = self.inbox, []
        return events

    async def decide(self, event_id: int, text: str) -> None:
        self.decisions[event_id] = text
        if event_id in self.waiters:
            self.waiters[event_id].set()

    async def publish(self, status: dict) -> None:
        self.status = dict(status, published=time.time())

    async def get_status(self) -> dict:
        return self.status


class JobClient:
    """Python API to a running job: ``JobClient("myjob").relayout("dp=2,tp=2")``."""

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
