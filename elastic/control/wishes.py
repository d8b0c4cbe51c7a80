"""What the job wants beyond its next step, and how events change it.

``Wishes`` holds the goals that outlive any one state: the worker budget (never above ``max_workers``,
whoever asks), the workers to drain,
the training phase (and the layouts the operator pinned per phase), and an operator pause.
``fold`` applies a batch of events and returns what the Planning state must act on: whether it must
move, why, a layout the operator asked for, a stop, the events it refuses (with the reason), and how
many warming workers the new budget no longer needs. It changes nothing but the wishes themselves:
the caller answers requests and talks to the workers. Pure Python.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from elastic.control.events import AddWorkers, Drain, Event, Pause, PhaseChange, Relayout, Resume, SetBudget, Stop
from elastic.core.layout import Layout


@dataclass
class Folded:
    """The planning input a batch of events produced."""

    must_move: bool = False
    reason: str = ""
    forced: Layout | None = None
    stop: bool = False
    refused: list[tuple[Event, str]] = field(default_factory=list)
    cancel_starting: int = 0


class Wishes:
    def __init__(self, budget: int, max_workers: int, phase_layouts: dict[str, Layout] | None = None) -> None:
        self.budget, self.max_workers = min(budget, max_workers), max_workers
        self.draining: set[int] = set()
        self.drain_deadlines: dict[int, float] = {}  # draining worker -> when its notice says it goes (epoch s)
        self.phase = "train"
        self.paused = False
        self.phase_layouts = dict(phase_layouts or {})

    def usable(self, warm: Iterable[int]) -> list[int]:
        """The warm workers the job may still use: those not being drained."""
        return [w for w in warm if w not in self.draining]

    def forget(self, workers: Iterable[int]) -> None:
        """Workers that died (or left) are no longer being drained."""
        workers = list(workers)
        self.draining -= set(workers)
        for w in workers:
            self.drain_deadlines.pop(w, None)

    def earliest_deadline(self, workers: Iterable[int]) -> float | None:
        """The first drain deadline among ``workers`` (epoch seconds; None: none of them has one)."""
        deadlines = [self.drain_deadlines[w] for w in workers if w in self.draining and w in self.drain_deadlines]
        return min(deadlines, default=None)

    def fold(self, events: list[Event], live: frozenset[int], usable: int, starting: int,
             validate: Callable[[Layout, int], None]) -> Folded:
        """Apply ``events`` in order. ``live``: every worker process of the job; ``usable``: warm workers not
        being drained; ``starting``: workers warming up; ``validate(layout, usable)`` raises ValueError for a
        layout the job cannot run."""
        out, reasons = Folded(), []
        for event in events:
            problem = event.problem()
            room = self.max_workers - usable - starting
            if problem is None and isinstance(event, AddWorkers) and event.count > room:
                problem = (f"adding {event.count} workers would make {usable + starting + event.count}, above "
                           f"control.max_workers={self.max_workers}; add at most {room}")
            if problem is not None:
                out.refused.append((event, problem))
                continue
            reasons.append(event.describe())
            if isinstance(event, SetBudget):
                self.budget = min(event.workers, self.max_workers)
                surplus = usable + starting - self.budget
                out.cancel_starting = max(out.cancel_starting, min(surplus, starting))
            elif isinstance(event, AddWorkers):
                self.budget = min(usable + starting + event.count, self.max_workers)
            elif isinstance(event, Drain):
                if event.worker not in live:
                    out.refused.append((event, f"worker {event.worker} is not part of this job"))
                    continue
                if event.worker not in self.draining:
                    self.draining.add(event.worker)
                    usable -= 1
                if event.deadline is not None:
                    known = self.drain_deadlines.get(event.worker, event.deadline)
                    self.drain_deadlines[event.worker] = min(known, event.deadline)
                # The drained worker is not replaced here (a new one could land where it was); the budget falls
                # to what is left, once: a node's capacity drop (cluster watcher) and its workers' drains are
                # one loss, not two.
                self.budget = max(1, min(self.budget, usable + starting))
                out.must_move = True
            elif isinstance(event, Relayout):
                try:
                    validate(event.layout, usable)
                except ValueError as err:
                    out.refused.append((event, str(err)))
                    continue
                out.forced = event.layout
            elif isinstance(event, PhaseChange):
                self.phase = event.phase
                if event.phase in self.phase_layouts:  # the operator pinned a layout for this phase
                    out.forced = self.phase_layouts[event.phase]
            elif isinstance(event, Pause):
                self.paused = True
            elif isinstance(event, Resume):
                self.paused = False
            elif isinstance(event, Stop):
                out.stop = True
        out.reason = "; ".join(reasons)
        return out
