"""Typed work the driver sends to a worker: a small dataclass whose ``run`` executes inside the worker.

The driver never names worker methods by string to run training code or to read a worker's data. It
builds a task per worker (``TrainStep()``, ``ReadTensors()``, ``EvalLoss()``, a recipe's own task such as
GRPO's rollout, or a benchmark's probe) and the worker group ships it; Ray pickles it by reference to its
class, so the worker imports the recipe module on first use and the worker module itself imports no recipe.
A task runs on the worker's compute thread, after the worker has settled its engine at the job's committed
step, and its failures fail fast like a step's.

``TaskContext.scratch`` is a per-engine dict that a recipe may use for caches tied to the engine's
life (GRPO keeps its sampling model there); the worker empties it whenever it builds a new engine. A task
that reads no engine (a probe of the process) sets ``needs_engine = False``; it then also runs on an idle
worker, with ``engine`` None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from elastic.runtime.engine import Engine, StepResult


@dataclass
class TaskContext:
    """What a task sees on the worker: its id, its engine (None only for ``needs_engine = False`` tasks), the
    engine's scratch space and the worker's skeleton cache (``runtime/skeletons.py``)."""

    worker: int
    engine: Engine | None
    scratch: dict[str, Any] = field(default_factory=dict)
    skeletons: Any = None


class WorkerTask(Protocol):
    """Work for one worker. ``run`` returns a StepResult for a training step, anything picklable otherwise."""

    def run(self, ctx: TaskContext) -> Any: ...


@dataclass(frozen=True)
class TrainStep:
    """One next-token-prediction optimizer step on this rank's share of the global batch."""

    def run(self, ctx: TaskContext) -> StepResult:
        return ctx.engine.compute()


@dataclass(frozen=True)
class ReadTensors:
    """Copies of this rank's training tensors, for the driver (the final gather of small models)."""

    def run(self, ctx: TaskContext) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in ctx.engine.local_tensors().items()}


@dataclass(frozen=True)
class EvalLoss:
    """This rank's (sum of token losses, target tokens) over its share of the held-out rows ``indices`` (None:
    every held-out row), with the number of rows the whole set has, at the committed weights. A forward only:
    no gradient, no optimizer state, no training sample (the data cursor is the step, which this leaves alone)."""

    indices: tuple[int, ...] | None = None

    def run(self, ctx: TaskContext) -> tuple[float, int, int]:
        engine = ctx.engine
        indices = list(range(engine.dataset.holdout_size()) if self.indices is None else self.indices)
        return (*engine.eval_loss(indices, "holdout"), len(indices))
