"""What the controller runs between events: one optimizer step of a workload per tick.

A workload's ``step(job)`` returns the per-worker results of one committed optimizer step, or None
when it did other work this tick (a rollout, or asking for a phase change through ``job.submit``).
``phase_filters`` names, per training phase, the layouts that phase can run on. ``evaluate(job)``, when a
workload has it, returns TRL's eval metrics of the current weights on the held-out rows
(``control/evaluation.py``, called every ``train.eval_every`` steps). ``restart_every``
is the number of optimizer steps between the points a run can restart from: the controller takes
snapshots and checkpoints only at its multiples, because a workload may keep driver-side state
between them that a snapshot of the workers' tensors does not hold (GRPO's rollout batch, reused for
``num_iterations`` steps). Recipes bring their own workloads (GRPO's is in
``recipes/grpo/workload.py``); next-token prediction is here (every step is such a point).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from elastic.control.evaluation import combine_losses
from elastic.control.events import Event
from elastic.core.layout import Layout
from elastic.driver.group import WorkerGroup
from elastic.runtime.engine import StepResult
from elastic.runtime.tasks import EvalLoss


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

    def evaluate(self, job: JobView) -> dict[str, float]:
        """``eval_loss``: the mean token NLL over every held-out row, sharded over the current placement's ranks."""
        placement = job.group.placement
        results = job.group.run({w: EvalLoss() for w in placement.workers})
        total, tokens, rows = combine_losses(results, placement)
        return {"eval_loss": total / max(tokens, 1), "eval_samples": rows}
