"""How events reach the controller, and how operator requests get their one answer.

Events come from polled sources (scripted, the cluster watcher), from the control plane's mailbox
(operator requests; looking costs nothing when none is waiting, see ``control_plane.py``) and from
inside the driver (``submit``: a workload's phase change). The status goes to the control plane when
the state changes, and at most every ``poll_interval_s`` otherwise. ``answer`` replies to requests that
carry an id. Each request is answered exactly once: a request refused while folding keeps that answer,
and the planning outcome later sent to the whole batch skips it.

``PlaneLink`` is the controller's side of the control plane: ``RayPlaneLink`` (``control_plane.py``)
for a named Ray actor, or an in-memory one in tests.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Protocol

from elastic.control.events import Event
from elastic.control.sources import EventSource


class PlaneLink(Protocol):
    def take(self) -> list[Event]:
        """Requests that arrived since the last call."""
    def answer(self, event_id: int, text: str) -> None: ...
    def publish(self, status: dict) -> None: ...
    def close(self) -> None: ...


class Inbox:
    def __init__(self, sources: Iterable[EventSource], plane: PlaneLink | None = None,
                 poll_interval_s: float = 0.5) -> None:
        self.sources, self.plane, self.poll_interval_s = list(sources), plane, poll_interval_s
        self._submitted: list[Event] = []
        self._answered: set[int] = set()
        self._next_publish, self._published_state = 0.0, None

    def submit(self, event: Event) -> None:
        """Deliver an event from inside the driver (e.g. a training loop's phase change)."""
        self._submitted.append(event)

    def poll(self, step: int) -> list[Event]:
        """Everything that arrived: submitted events, then the sources', then the operator's requests."""
        events, self._submitted = self._submitted, []
        for source in self.sources:
            events.extend(source.poll(step))
        if self.plane is not None:
            events.extend(self.plane.take())
        return events

    def answer(self, events: Iterable[Event], text: str) -> None:
        """Reply ``text`` to every request among ``events`` that has not had its answer yet."""
        for event in events:
            if event.id and event.id not in self._answered:
                self._answered.add(event.id)
                if self.plane is not None:
                    self.plane.answer(event.id, text)

    def publish(self, status: dict, force: bool = False) -> None:
        """Send the job's status to the control plane if the state changed or a poll interval has passed."""
        now = time.monotonic()
        if self.plane is None or not (force or status["state"] != self._published_state or now >= self._next_publish):
            return
        self._next_publish, self._published_state = now + self.poll_interval_s, status["state"]
        self.plane.publish(status)

    def close(self) -> None:
        if self.plane is not None:
            self.plane.close()
            self.plane = None
