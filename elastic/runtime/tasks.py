"""Typed work the driver sends to a worker: a small dataclass whose ``run`` executes inside the worker.

The driver never names worker methods by string to run training code. It builds a task per worker
(``TrainStep()``, or a recipe's own task such as GRPO's rollout) and the worker group ships it; Ray
pickles it by reference to its class, so the worker imports the recipe module on first use and the
worker module itself imports no recipe. A task runs on the worker's compute thread, after the worker
has settled its engine at the job's committed step, and its failures fail fast like a step's.

``TaskContext.scratch`` is a per-engine dict that a recipe may use for caches tied to the engine's
life (GRPO keeps its sampling model there); the worker empties it whenever it builds a new engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from elastic.runtime.engine import Engine, StepResult


@dataclass
class TaskContext:
    """What a task sees on the worker."""

    worker: int
    engine: Engine
    scratch: dict[str, Any] = field(default_factory=dict)


class WorkerTask(Protocol):
    """Work for one worker. ``run`` returns a StepResult for a training step, anything picklable otherwise."""

    def run(self, ctx: TaskContext) -> Any: ...


@dataclass(frozen=True)
class TrainStep:
    """One next-token-prediction optimizer step on this rank's share of the global batch."""

    def run(self, ctx: TaskContext) -> StepResult:
        return ctx.engine.compute()


@dataclass(frozen=True)
class EvalLoss:
    """(sum of token losses, target tokens) on this rank's share of the given samples (no pp)."""

    indices: tuple[int, ...]
    split: str = "holdout"

    def run(self, ctx: TaskContext) -> tuple[float, int]:
        return ctx.engine.eval_loss(list(self.indices), self.split)
