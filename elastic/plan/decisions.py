"""The policy's answer, as one of four types: ``Stay | Move | Pause | Refuse``.

Every outcome of ``Policy.decide`` is a value of its own type, never ``None`` or an exception, so the
controller's Planning and Recovering states take it apart with one ``match`` (as Ray Train v2's
controller executes a ``NoopDecision | ResizeDecision`` from its scaling policy). Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from elastic.core.layout import Layout, Placement
from elastic.plan.planner import Plan


@dataclass(frozen=True)
class Stay:
    """Keep the current placement."""

    reason: str

    def describe(self) -> str:
        return f"stay: {self.reason}"


@dataclass(frozen=True)
class Move:
    """Go to ``placement``, for ``reason``, with what the cost model expects.

    ``plan`` is the reshard plan from the current placement that the cost was computed from (the resharder
    runs exactly it), ``round_bytes`` the bytes a worker may send plus receive per round of it (the headroom
    of the workers taking part; 0: ``runtime.reshard_round_bytes``). ``rebuild`` is set when some shard has
    no live holder: no plan can be made, and every rank is rebuilt from the newest snapshot, checkpoint or
    the seed instead. A placement may name workers not started yet (negative ids): the controller starts
    them first.
    """

    placement: Placement
    reason: str
    step_seconds: float = 0.0
    reshard_seconds: float = 0.0
    current_step_seconds: float | None = None
    plan: Plan | None = field(default=None, compare=False, repr=False)
    rebuild: bool = False
    round_bytes: int = field(default=0, compare=False)

    def describe(self) -> str:
        now = f", now {self.current_step_seconds:.3f} s/step" if self.current_step_seconds else ""
        return (f"{self.placement.layout} on {len(self.placement.workers)} workers: {self.reason} "
                f"(predicted {self.step_seconds:.3f} s/step{now}, reshard {self.reshard_seconds:.2f} s)")


@dataclass(frozen=True)
class Pause:
    """No valid placement for the workers at hand: wait for more."""

    reason: str

    def describe(self) -> str:
        return f"pause: {self.reason}"


@dataclass(frozen=True)
class Refuse:
    """The layout asked for (``request``) cannot run here; ``reason`` says why, in one line with the fix."""

    request: Layout
    reason: str

    def describe(self) -> str:
        return f"refused: {self.reason}"


Decision = Stay | Move | Pause | Refuse
