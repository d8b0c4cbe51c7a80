"""The controller's states: one frozen dataclass per state, carrying what its handler needs.

    Planning     -> Launching     the first placement, from the seed
                 -> Resuming      the first placement, from a checkpoint
                 -> Preparing     a move whose skeleton is still being built: train meanwhile
                 -> Resharding    a move whose skeleton is ready, or built on the stall
                 -> Running       stay; or workers are still warming up
                 -> Paused        no valid layout; an operator pause
                 -> Recovering    the placement lost a worker outside a call
                 -> Finishing     an operator stop
    Launching    -> Running       the placement is formed
                 -> Planning      a worker died meanwhile: plan without it
    Resuming     -> Running       the placement is formed
                 -> Planning      a worker died meanwhile: plan without it
    Preparing    -> Preparing     one optimizer step while the skeleton builds
                 -> Resharding    the skeleton is built, or the move waited long enough
                 -> Planning      events arrived: decide again, the parked requests ride along
                 -> Recovering    a worker died: the parked requests are told the move is cancelled
                 -> Finishing     every step is done: the parked requests are told so
    Running      -> Running       one optimizer step
                 -> Planning      events arrived, or new workers are warm
                 -> Recovering    a worker died (step, snapshot, checkpoint)
                 -> Finishing     every step is done
    Resharding   -> Running       moved; or the transfer failed with the old placement intact
                 -> Recovering    a worker died mid-commit, or the old placement lost one mid-transfer
    Recovering   -> Resharding    the recovery's move: from replicas, or rebuilt from a snapshot, a checkpoint
                                  or the seed
                 -> Recovering    another worker died while the survivors settled
                 -> Paused        too few workers left; waiting for more
    Paused       -> Planning      events arrived, or new workers are warm
                 -> Paused        nothing yet (it sleeps a poll interval)
    Finishing    -> Done          the final tensors gathered on the driver
                 -> Recovering    a worker died while they were gathered

``EDGES`` is this table as data (``TRANSITIONS`` is derived from it), and ``diagram()`` renders the
text above from it: ``tests/controller/test_states.py`` checks that this docstring is what it renders.
The controller checks every transition against ``TRANSITIONS`` at run time. ``Done`` is terminal.
Every move (a plan, a recovery from replicas, a rebuild) goes through ``Resharding``. Pure Python.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Planning:
    """Fold ``events`` into the job's wishes and ask the policy where to run. ``carried``: requests of a move
    that was decided earlier and superseded before it happened; they get this planning's answer. ``forced``:
    the layout that move was asked for, kept unless a newer request names another."""

    events: tuple = ()
    carried: tuple = ()
    forced: Any = None


@dataclass(frozen=True)
class Launching:
    """Build the first placement (``move.placement``) from the seed."""

    move: Any
    requests: tuple = ()  # operator requests answered once the placement runs


@dataclass(frozen=True)
class Resuming:
    """Build the first placement from the checkpoint in ``folder``."""

    move: Any
    folder: Path
    requests: tuple = ()


@dataclass(frozen=True)
class Preparing:
    """A decided ``move`` waits for its skeleton (built in the background) while training goes on; it was
    decided at step ``since``. ``fresh``: no step has run on the current placement yet. ``forced``: the layout
    the operator (or a phase pin) asked for, if the move came from such a request."""

    move: Any
    requests: tuple = ()
    since: int = 0
    fresh: bool = False
    forced: Any = None


@dataclass(frozen=True)
class Resharding:
    """Carry out ``move``: a live reshard along its plan, or (``move.rebuild``) a rebuild from the newest state
    that exists. ``recovering``: the move recovers from a loss (``RecoveryStart``), else None."""

    move: Any
    requests: tuple = ()  # operator requests answered with the outcome
    recovering: Any = None


@dataclass(frozen=True)
class RecoveryStart:
    """What a recovery's report needs from its start: who died, when, and the committed step then."""

    dead: tuple[int, ...]
    started: float
    step: int


@dataclass(frozen=True)
class Running:
    """Train one step per tick. ``fresh``: the placement's first step (it pays one-off costs, so the
    cost model does not calibrate on it)."""

    fresh: bool = False


@dataclass(frozen=True)
class Recovering:
    """Workers died (``failure.dead``): settle the survivors and decide where to go. ``requests``: operator
    requests that were waiting on a move the loss cancelled; they are told so. ``since``: the start of a
    recovery this loss interrupted, so that its report names every worker lost and times it from the first."""

    failure: Any
    requests: tuple = ()
    since: RecoveryStart | None = None


@dataclass(frozen=True)
class Paused:
    """Wait for events or workers."""

    reason: str


@dataclass(frozen=True)
class Finishing:
    """Gather the final tensors on the driver (every step done, or stopped on request)."""

    reason: str


@dataclass(frozen=True)
class Done:
    """The run is over; ``tensors`` are its final training tensors (None when not gathered); ``export`` what the
    workers wrote of its model (``driver/exporter.ExportReport``; None when the run writes none)."""

    reason: str
    tensors: Any = field(default=None, compare=False, repr=False)
    export: Any = field(default=None, compare=False, repr=False)


STATES = (Planning, Launching, Resuming, Preparing, Resharding, Running, Recovering, Paused, Finishing, Done)

# (from, to, why): the transition table, in the order the diagram shows it.
EDGES: tuple[tuple[type, type, str], ...] = (
    (Planning, Launching, "the first placement, from the seed"),
    (Planning, Resuming, "the first placement, from a checkpoint"),
    (Planning, Preparing, "a move whose skeleton is still being built: train meanwhile"),
    (Planning, Resharding, "a move whose skeleton is ready, or built on the stall"),
    (Planning, Running, "stay; or workers are still warming up"),
    (Planning, Paused, "no valid layout; an operator pause"),
    (Planning, Recovering, "the placement lost a worker outside a call"),
    (Planning, Finishing, "an operator stop"),
    (Launching, Running, "the placement is formed"),
    (Launching, Planning, "a worker died meanwhile: plan without it"),
    (Resuming, Running, "the placement is formed"),
    (Resuming, Planning, "a worker died meanwhile: plan without it"),
    (Preparing, Preparing, "one optimizer step while the skeleton builds"),
    (Preparing, Resharding, "the skeleton is built, or the move waited long enough"),
    (Preparing, Planning, "events arrived: decide again, the parked requests ride along"),
    (Preparing, Recovering, "a worker died: the parked requests are told the move is cancelled"),
    (Preparing, Finishing, "every step is done: the parked requests are told so"),
    (Running, Running, "one optimizer step"),
    (Running, Planning, "events arrived, or new workers are warm"),
    (Running, Recovering, "a worker died (step, snapshot, checkpoint)"),
    (Running, Finishing, "every step is done"),
    (Resharding, Running, "moved; or the transfer failed with the old placement intact"),
    (Resharding, Recovering, "a worker died mid-commit, or the old placement lost one mid-transfer"),
    (Recovering, Resharding, "the recovery's move: from replicas, or rebuilt from a snapshot, a checkpoint or "
                             "the seed"),
    (Recovering, Recovering, "another worker died while the survivors settled"),
    (Recovering, Paused, "too few workers left; waiting for more"),
    (Paused, Planning, "events arrived, or new workers are warm"),
    (Paused, Paused, "nothing yet (it sleeps a poll interval)"),
    (Finishing, Done, "the final tensors gathered on the driver"),
    (Finishing, Recovering, "a worker died while they were gathered"),
)

TRANSITIONS: dict[type, frozenset[type]] = {
    state: frozenset(dst for src, dst, _ in EDGES if src is state) for state in STATES}


def diagram(indent: int = 4, width: int = 110) -> str:
    """The transition table as the text at the top of this module (one line per edge, sources grouped)."""
    pad, lines, previous = " " * indent, [], None
    for src, dst, why in EDGES:
        left = f"{src.__name__:<12} " if src is not previous else " " * 13
        head = f"{pad}{left}-> {dst.__name__:<13} "
        wrapped = textwrap.wrap(why, width - len(head)) or [""]
        lines.append(head + wrapped[0])
        lines.extend(" " * len(head) + more for more in wrapped[1:])
        previous = src
    return "\n".join(lines)


class IllegalTransition(RuntimeError):
    """A handler chose a next state the transition table does not allow (a bug in the controller)."""


@dataclass(frozen=True)
class Transition:
    previous: Any
    next: Any

    def check(self) -> Transition:
        allowed = TRANSITIONS[type(self.previous)]
        if type(self.next) not in allowed:
            names = sorted(cls.__name__ for cls in allowed) or ["nothing (terminal)"]
            raise IllegalTransition(f"{type(self.previous).__name__} -> {type(self.next).__name__} is not a "
                                    f"transition of the controller; from {type(self.previous).__name__} it may go "
                                    f"to {', '.join(names)}")
        return self

    @property
    def changes_state(self) -> bool:
        return type(self.previous) is not type(self.next)

    def describe(self) -> str:
        return f"{type(self.previous).__name__} -> {type(self.next).__name__}"


def name(state: Any) -> str:
    """The state's name as status and events.jsonl show it: "running", "planning", ..."""
    return type(state).__name__.lower()


if __name__ == "__main__":  # print the diagram, to paste into the docstring after changing EDGES
    print(diagram())
