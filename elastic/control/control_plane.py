"""The running job's named Ray actor: a mailbox for operator requests and a status board.

The controller loop runs in the job's driver; this small actor is how anything else reaches it.
``JobClient`` (``client.py``, and the ``elastic events`` CLI) submits an event and waits for the
controller's decision; the controller answers each request once and publishes its status (state,
layout, workers, step, last reshard) when it changes state, and at most every poll interval otherwise.

The driver does not poll the mailbox with a round trip: it keeps one ``next_requests`` call outstanding,
which the actor answers as soon as a request arrives, and looks at it between steps with a local
``ray.wait(timeout=0)``. A request is therefore picked up at the next step boundary, and a quiet job
sends the actor nothing but its status.

Actor name: ``elastic:<job name>`` in the ``elastic`` namespace.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time

import ray

from elastic.control.events import Event

NAMESPACE = "elastic"


def actor_name(job: str) -> str:
    return f"elastic:{job}"


@ray.remote(num_cpus=0, max_restarts=0)
class ControlPlane:
    def __init__(self) -> None:
        self.inbox: list[Event] = []
        self.arrived = asyncio.Event()
        self.decisions: dict[int, str] = {}
        self.waiters: dict[int, asyncio.Event] = {}
        self.status: dict = {"state": "starting"}
        self.ids = itertools.count(1)

    async def request(self, event: Event, timeout_s: float = 120.0) -> str:
        """Queue ``event`` and wait for the controller's answer (a malformed one is refused here, at once)."""
        problem = event.problem()
        if problem is not None:
            return f"refused: {problem}"
        event_id = next(self.ids)
        event = dataclasses.replace(event, id=event_id)
        self.waiters[event_id] = asyncio.Event()
        self.inbox.append(event)
        self.arrived.set()
        try:
            await asyncio.wait_for(self.waiters[event_id].wait(), timeout_s)
        except TimeoutError:
            return f"no decision within {timeout_s:.0f} s (the job may be busy or stopping)"
        finally:
            self.waiters.pop(event_id, None)
        return self.decisions.pop(event_id)

    async def next_requests(self) -> list[Event]:
        """The requests queued since the last call, once there is at least one (the driver's long poll)."""
        await self.arrived.wait()
        self.arrived.clear()
        events, self.inbox = self.inbox, []
        return events

    async def decide(self, event_id: int, text: str) -> None:
        if event_id in self.waiters:  # a request nobody waits for any more (timed out) gets no stored answer
            self.decisions[event_id] = text
            self.waiters[event_id].set()

    async def publish(self, status: dict) -> None:
        self.status = dict(status, published=time.time())

    async def get_status(self) -> dict:
        return self.status


class RayPlaneLink:
    """The controller's link to its ControlPlane actor (see ``inbox.PlaneLink``)."""

    def __init__(self, job: str) -> None:
        self.actor = ControlPlane.options(name=actor_name(job), namespace=NAMESPACE).remote()
        self._next = self.actor.next_requests.remote()

    def take(self) -> list[Event]:
        """Requests that arrived, without a round trip when there are none."""
        ready, _ = ray.wait([self._next], timeout=0)
        if not ready:
            return []
        events, self._next = ray.get(self._next), self.actor.next_requests.remote()
        return events

    def answer(self, event_id: int, text: str) -> None:
        self.actor.decide.remote(event_id, text)

    def publish(self, status: dict) -> None:
        self.actor.publish.remote(status)

    def close(self) -> None:
        ray.kill(self.actor)
