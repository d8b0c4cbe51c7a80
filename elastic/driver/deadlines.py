"""When the driver looks at workers that have not answered a call yet, and what makes one hung.

No fixed constant ends a call. Each call belongs to a phase (a step, a rollout, a transfer, a checkpoint
write, ...); ``Deadlines`` keeps the durations the job measured per phase, and a call's *window* is
``deadline_factor`` times the slowest recent one, never less than ``deadline_floor_s`` (before anything
was measured: the floor, or the cost model's prediction times the factor when the caller has one). A
window passing ends nothing by itself: it makes the driver probe the workers still busy
(``Worker.probe``, answered by a control thread, see ``runtime/liveness.py``), and ``verdict`` names
the hung ones from what the probe saw:

- a worker that does not answer the probe within ``ping_timeout_s`` is hung (stopped, or its process
  wedged: a live one answers in milliseconds);
- a worker that is not communicating, whose compute thread used (almost) no CPU and started no new call
  over a whole window, is hung if its peers finished the call or wait on it (a stuck read, a deadlocked
  thread). A window spans several whole steps, and working code burns CPU all through it.

Anything else (every busy worker computing, or waiting on one that is) is a slow call: the window is
extended and the call goes on. Pure Python.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass

IDLE_SHARE = 0.01  # a compute thread that used less than this share of a window's CPU did not work in it


@dataclass(frozen=True)
class Look:
    """What the driver saw of one busy worker at the end of a window (None: no answer to the probe)."""

    in_collective: bool
    cpu_seconds: float
    tasks: int
    at: float  # when (driver's monotonic clock)


class Deadlines:
    def __init__(self, factor: float, floor_s: float, keep: int = 8) -> None:
        self.factor, self.floor_s = factor, floor_s
        self._seen: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=keep))

    def observe(self, phase: str, seconds: float) -> None:
        self._seen[phase].append(seconds)

    def window(self, phase: str, predicted: float | None = None) -> float:
        """How long a call of ``phase`` runs before the driver looks at its busy workers."""
        seen = self._seen.get(phase)
        typical = max(seen) if seen else predicted
        return max(self.floor_s, self.factor * typical) if typical else self.floor_s


def verdict(looks: dict[int, Look | None], before: dict[int, Look], finished: bool) -> dict[int, str]:
    """The hung workers among the busy ones (worker -> why), from this window's ``looks`` and the previous
    window's (``before``; empty at the first look). ``finished``: some member of the call already answered."""
    hung = {w: "no answer to a liveness probe (stopped, or its process is wedged)"
            for w, look in looks.items() if look is None}
    if hung:
        return hung
    waited_on = finished or any(look.in_collective for look in looks.values())
    for w, look in looks.items():
        prior = before.get(w)
        if prior is None or look.in_collective or not waited_on:
            continue
        idle = look.tasks == prior.tasks and look.cpu_seconds - prior.cpu_seconds < IDLE_SHARE * (look.at - prior.at)
        if idle:
            hung[w] = (f"its compute thread used {look.cpu_seconds - prior.cpu_seconds:.2f} s of CPU in "
                       f"{look.at - prior.at:.0f} s while its peers finished or waited on it")
    return hung
