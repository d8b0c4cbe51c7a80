"""What the controller runs between events: one optimizer step of a workload per tick.

A workload's ``step(job)`` returns the per-worker results of one committed optimizer step, or None
when it did other work this tick (a rollout, or asking for a phase change through ``job.submit``).
``phase_filters`` names, per training phase, the layouts that phase can run on. ``restart_every``
is the number of optimizer steps between the points a run can restart from: the controller takes
snapshots and checkpoints only at its multiples, because a workload may keep driver-side state
between them that a snapshot of the workers' tensors does not hold (GRPO's rollout batch, reused for
``num_iterations`` steps). Recipes bring their own workloads (GRPO's is in
``recipes/grpo/workload.py``); next-token prediction is here (every step is such a point).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from elastic.control.events import Event
from elastic.core.layout import Layout
from elastic.driver.group import WorkerGroup
from elastic.runtime.engine import StepResult


class JobView(Protocol):
    """The part of the controller a workload sees."""

    group: WorkerGroup

    @property
    def phase(self) -> str: ...
    def submit(self, event: Event) -> None: ...


class Workload(Protocol):
    name: str
    restart_every: int  # snapshots and checkpoints only at multiples of this many optimizer steps

    def phase_filters(self) -> dict[str, Callable[[Layout], bool]]: ...
    def step(self, job: JobView) -> dict[int, StepResult] | None: ...


class LMWorkload:
    """Next-token prediction on the configured dataset (pre-training, LoRA SFT)."""

    name = "lm"
    restart_every = 1

    def phase_filters(self) -> dict[str, Callable[[Layout], bool]]:
        return {}

    def step(self, job: JobView) -> dict[int, StepResult]:
        return job.group.step()
