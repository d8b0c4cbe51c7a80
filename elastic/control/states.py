"""The controller's states: one frozen dataclass per state, carrying what its handler needs.

    Planning(events) ----------> Launching(decision)      first placement, from the seed
        |   |   |  \\-----------> Resuming(decision, folder) first placement, from a checkpoint
        |   |   \\--------------> Resharding(decision)     move live to the decision's placement
        |   \\------------------> Running(fresh)           stay; or workers are still warming up
        \\----------------------> Paused(reason)           no valid layout; operator pause
        \\----------------------> Recovering(failure)      the placement lost a worker outside a call
        \\----------------------> Finishing(reason)        operator stop
    Launching, Resuming --------> Running(fresh=True)      the placement is formed
        \\----------------------> Planning()               a worker died meanwhile: plan without it
    Running(fresh) -------------> Running(fresh=False)     one optimizer step
        |   |   |   \\----------> Resharding(decision)     the next placement's skeleton is ready
        |   |   \\--------------> Planning(events)         events arrived, or new workers are warm
        |   \\------------------> Recovering(failure)      a worker died (step, snapshot, checkpoint)
        \\----------------------> Finishing(reason)        every step is done
    Finishing(reason) ---------> Done(reason, tensors)    the final tensors gathered on the driver
        \\----------------------> Recovering(failure)      a worker died while they were gathered
    Resharding ----------------> Running(fresh=True)      moved; or failed with the old placement intact
        \\----------------------> Recovering(failure)      a worker died mid-commit, or the old placement
                                                          lost a worker mid-transfer
    Recovering(failure) -------> Running(fresh=True)      from replicas; or a snapshot, a checkpoint or
                                                          the seed, and a replay
        |   \\------------------> Recovering(failure)      another worker died while recovering
        \\----------------------> Paused(reason)           too few workers left; waiting for more
    Paused(reason) ------------> Planning(events)         events arrived, or new workers are warm
        \\----------------------> Paused(reason)           nothing yet (it sleeps a poll interval)

``TRANSITIONS`` is the same table as data. The controller checks every transition against it at run
time, and ``tests/controller/test_states.py`` checks this diagram against the table, edge by edge.
``Done`` is terminal. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Planning:
    """Fold ``events`` into the job's wishes and ask the policy where to run."""

    events: tuple = ()


@dataclass(frozen=True)
class Launching:
    """Build the first placement (``decision.placement``) from the seed."""

    decision: Any
    requests: tuple = ()  # operator requests answered once the placement runs


@dataclass(frozen=True)
class Resuming:
    """Build the first placement from the checkpoint in ``folder``."""

    decision: Any
    folder: Path
    requests: tuple = ()


@dataclass(frozen=True)
class Resharding:
    """Move live to ``decision.placement`` along ``decision.plan`` (the plan the policy priced)."""

    decision: Any
    requests: tuple = ()  # operator requests answered with the outcome


@dataclass(frozen=True)
class Running:
    """Train one step per tick. ``fresh``: the placement's first step (it pays one-off costs, so the
    cost model does not calibrate on it)."""

    fresh: bool = False


@dataclass(frozen=True)
class Recovering:
    """Workers died (``failure.dead``): settle the survivors and move on, replicas first, else a snapshot."""

    failure: Any


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
    """The run is over; ``tensors`` are its final training tensors (None when not gathered)."""

    reason: str
    tensors: Any = field(default=None, compare=False, repr=False)


STATES = (Planning, Launching, Resuming, Resharding, Running, Recovering, Paused, Finishing, Done)

TRANSITIONS: dict[type, frozenset[type]] = {
    Planning: frozenset({Launching, Resuming, Resharding, Running, Paused, Recovering, Finishing}),
    Launching: frozenset({Running, Planning}),
    Resuming: frozenset({Running, Planning}),
    Running: frozenset({Running, Planning, Recovering, Finishing, Resharding}),
    Resharding: frozenset({Running, Recovering}),
    Recovering: frozenset({Running, Recovering, Paused}),
    Paused: frozenset({Planning, Paused}),
    Finishing: frozenset({Done, Recovering}),
    Done: frozenset(),
}


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
