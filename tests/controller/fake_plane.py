"""An in-memory control plane: operator requests in, the controller's answers recorded per request."""

from __future__ import annotations

import dataclasses
import itertools

from elastic.control.events import Event


class FakePlane:
    def __init__(self) -> None:
        self.inbox: list[Event] = []
        self.answers: dict[int, list[str]] = {}
        self.statuses: list[dict] = []
        self._ids = itertools.count(1)

    def request(self, event: Event) -> int:
        """Queue an operator request (as JobClient does); returns its id."""
        event_id = next(self._ids)
        self.inbox.append(dataclasses.replace(event, id=event_id))
        return event_id

    def take(self) -> list[Event]:
        events, self.inbox = self.inbox, []
        return events

    def answer(self, event_id: int, text: str) -> None:
        self.answers.setdefault(event_id, []).append(text)

    def publish(self, status: dict) -> None:
        self.statuses.append(status)

    def close(self) -> None:
        pass
