"""How the controller hears and answers events (a mixin of ``Controller``).

Events arrive from polled sources (scripted, the cluster watcher, the control plane's inbox)
and from the driver itself (``submit``). ``_apply`` folds them into the controller's wishes:
the worker budget, workers to drain, a requested layout, the training phase, pause and stop.
Requests from the control plane are answered with what the controller decided.
"""

from __future__ import annotations

import time

import ray

from elastic.control.events import (
    AddWorkers,
    Drain,
    Event,
    Pause,
    PhaseChange,
    Relayout,
    Resume,
    SetBudget,
    Stop,
)


class EventsMixin:
    def _publish(self) -> None:
        if self.plane is not None:
            self.plane.publish.remote(self.status())

    def _answer(self, events: list[Event], text: str) -> None:
        if self.plane is None:
            return
        for event in events:
            if event.id:
                self.plane.decide.remote(event.id, text)

    # ---- events -------------------------------------------------------------------------
    def _poll(self, force: bool = False) -> list[Event]:
        now = time.monotonic()
        events = []
        for source in self.sources:
            events.extend(source.poll(self.step))
        if self.plane is not None and (force or now >= self._next_poll):
            self._next_poll = now + self.opt.poll_interval_s
            events.extend(ray.get(self.plane.take_inbox.remote()))
        return events

    def submit(self, event: Event) -> None:
        """Deliver an event from inside the driver (e.g. a training loop's phase change)."""
        self.pending.append(event)

    def _apply(self, events: list[Event]) -> tuple[bool, str]:
        """Fold events into the controller's wishes. Returns (must move, reason)."""
        must, reasons = False, []
        for event in events:
            self.record("event", text=event.reason or type(event).__name__, type=type(event).__name__)
            reasons.append(event.reason or type(event).__name__)
            if isinstance(event, SetBudget):
                self.budget = event.workers
                surplus = len(self._usable()) + len(self.group.starting) - self.budget
                if surplus > 0 and self.group.starting:
                    cancelled = self.group.cancel_starting(surplus)
                    self.record("scale-in", text=f"cancelled starting workers {cancelled}: budget is {self.budget}")
            elif isinstance(event, AddWorkers):
                self.budget = len(self._usable()) + len(self.group.starting) + event.count
            elif isinstance(event, Drain):
                if event.worker not in self.group.actors:
                    self._answer([event], f"refused: worker {event.worker} is not part of this job")
                    continue
                self.draining.add(event.worker)
                self.budget = max(1, self.budget - 1)
                must = True
            elif isinstance(event, Relayout):
                try:
                    self.policy.validate_request(event.layout, len(self._usable()))
                except ValueError as err:
                    self._answer([event], f"refused: {err}; training continues on "
                                          f"{self.group.placement.layout if self.group.placement else '-'}")
                    self.record("refused", text=str(err))
                    continue
                self.forced = event.layout
            elif isinstance(event, PhaseChange):
                self.phase = event.phase
                if event.phase in self.opt.phase_layouts:  # the operator pinned a layout for this phase
                    self.forced = self.opt.phase_layouts[event.phase]
            elif isinstance(event, Pause):
                self.paused_by_operator = True
            elif isinstance(event, Resume):
                self.paused_by_operator = False
            elif isinstance(event, Stop):
                self.stopping = True
        return must, "; ".join(reasons)

    def _usable(self) -> list[int]:
        return [w for w in self.group.alive() if w not in self.draining]

