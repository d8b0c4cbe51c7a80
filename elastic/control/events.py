"""Events the controller reacts to (operator requests, the cluster, the training loop).

Each event is a frozen dataclass with a ``kind`` (an ``EventKind``), a human ``reason`` and an
``id`` that lets an operator's request wait for the controller's answer. ``problem()`` says what is wrong
with an event's values (a count that is not a positive integer, a layout that is not a layout), so that the
control plane refuses a malformed request at once and the controller never sees it. Sources are in
``sources.py``. Pure Python (the CLI imports this module, so it must stay light).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

from elastic.core.layout import Layout


class EventKind(enum.StrEnum):
    SET_BUDGET = "set-budget"
    ADD_WORKERS = "add-workers"
    DRAIN = "drain"
    RELAYOUT = "relayout"
    PHASE = "phase"
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"


@dataclass(frozen=True)
class Event:
    """Base class. ``id`` lets the operator's request wait for the controller's decision."""

    kind: ClassVar[EventKind]
    reason: str = ""
    id: int = field(default=0, compare=False)

    def describe(self) -> str:
        return self.reason or self.kind.value

    def problem(self) -> str | None:
        """Why this event cannot be acted on as given (one line naming the value), or None."""
        return None


def _count(name: str, value) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    return None if ok else f"{name} must be a positive whole number, got {value!r}"


@dataclass(frozen=True)
class SetBudget(Event):
    """Run on up to ``workers`` workers (operator request, or the cluster's capacity changed)."""

    kind: ClassVar[EventKind] = EventKind.SET_BUDGET
    workers: int = 0

    def problem(self) -> str | None:
        return _count("the worker budget", self.workers)


@dataclass(frozen=True)
class AddWorkers(Event):
    """Raise the budget by ``count`` workers."""

    kind: ClassVar[EventKind] = EventKind.ADD_WORKERS
    count: int = 1

    def problem(self) -> str | None:
        return _count("the number of workers to add", self.count)


@dataclass(frozen=True)
class Drain(Event):
    """Worker ``worker`` is going away (preemption notice, operator): move its shards off it first.
    ``deadline``: when it goes, in seconds since the epoch (Ray's drain deadline; None: no deadline)."""

    kind: ClassVar[EventKind] = EventKind.DRAIN
    worker: int = -1
    deadline: float | None = None

    def problem(self) -> str | None:
        ok = isinstance(self.worker, int) and not isinstance(self.worker, bool) and self.worker >= 0
        if not ok:
            return f"a worker id must be a whole number >= 0, got {self.worker!r}"
        deadline = self.deadline
        if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, float | int)):
            return f"a drain deadline must be seconds since the epoch or None, got {self.deadline!r}"
        return None


@dataclass(frozen=True)
class Relayout(Event):
    """The operator asks for this layout on the current workers."""

    kind: ClassVar[EventKind] = EventKind.RELAYOUT
    layout: Layout = Layout()

    def problem(self) -> str | None:
        return None if isinstance(self.layout, Layout) else f"a relayout needs a Layout, got {self.layout!r}"


@dataclass(frozen=True)
class PhaseChange(Event):
    """The training loop enters ``phase`` (e.g. "rollout" or "train"); layouts may prefer phases."""

    kind: ClassVar[EventKind] = EventKind.PHASE
    phase: str = "train"

    def problem(self) -> str | None:
        return None if isinstance(self.phase, str) and self.phase else f"a phase needs a name, got {self.phase!r}"


@dataclass(frozen=True)
class Pause(Event):
    """Stop training until resumed (the workers and their shards stay)."""

    kind: ClassVar[EventKind] = EventKind.PAUSE


@dataclass(frozen=True)
class Resume(Event):
    kind: ClassVar[EventKind] = EventKind.RESUME


@dataclass(frozen=True)
class Stop(Event):
    """Finish the step in flight and end the job cleanly (its final state is kept)."""

    kind: ClassVar[EventKind] = EventKind.STOP
