"""Evaluation during training (``train.eval_every``): every K committed optimizer steps, between two steps, the
workload evaluates the current weights on the held-out rows, and the result is logged under TRL's names.

Next-token prediction (``LMWorkload.evaluate``) sends every rank an ``EvalLoss`` task
(``runtime/tasks.py``): each data-parallel slice takes its balanced share of the held-out rows under the
current layout and returns (sum of token losses, target tokens); ``combine_losses`` adds the slices' sums
(``math.fsum``, the tokens as integers) and divides once, which is training's normalisation (a sum over
the batch divided by its target tokens), so ``eval_loss`` is the mean token NLL over every held-out row,
whatever the layout.

An evaluation is a worker task between steps, not a state: the controller's step path
(``handlers.train``) calls ``after_step`` once a step is counted, in Running and in Preparing alike. It moves
no data cursor (held-out rows are never training samples), takes no gradient and leaves the optimizer
alone, so training is the same with and without it. A worker lost during an evaluation is a failure like
one lost during a step; the step was already counted, and the evaluation of that step is not redone. A
replayed step is evaluated again, replacing its first result.

A workload may answer that the current layout cannot evaluate (GRPO's greedy sampling needs a data-parallel
layout, ``recipes/grpo/evaluation.py``): the evaluation is then put off and tried before each following tick
(``before_step``), for instance once the rollout phase's relayout is done, as long as no optimizer step comes
first; otherwise it is dropped, with a journal line.

Results go to ``metrics.jsonl`` (``eval_loss``, ``eval_samples``, ``eval_runtime``: a row of its own at the
step, which ``read_run`` merges into that step's row), TensorBoard (``eval/loss``) and one journal line.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from elastic.core.layout import Placement
from elastic.core.records import RecordKind
from elastic.tools.metrics import MetricsWriter

if TYPE_CHECKING:
    from elastic.control.controller import Controller


def combine_losses(results: Mapping[int, tuple[float, int, int]], placement: Placement) -> tuple[float, int, int]:
    """(sum of token losses, target tokens, rows) over every held-out row, from each rank's ``EvalLoss`` result.
    Only tp rank 0 of the last pipeline stage counts: tp ranks of one slice computed the same rows, and
    earlier stages report no loss."""
    layout = placement.layout
    parts = [results[w] for rank, w in enumerate(placement.workers)
             if layout.coord(rank).tp == 0 and layout.coord(rank).pp == layout.pp - 1]
    return math.fsum(p[0] for p in parts), sum(p[1] for p in parts), parts[0][2]


class Evaluation:
    """When to evaluate, and where the results go. ``history``: step -> the metrics logged there."""

    def __init__(self, every: int, metrics: MetricsWriter | None, record: Callable[..., dict]) -> None:
        self.every, self.metrics, self.record = every, metrics, record
        self.history: dict[int, dict[str, float]] = {}
        self.pending: int | None = None  # the committed step of an evaluation the layout put off

    def due(self, committed: int) -> bool:
        return self.every > 0 and committed > 0 and committed % self.every == 0

    def after_step(self, ctl: Controller) -> None:
        """Evaluate when ``ctl.step`` committed steps are a multiple of ``every``. Raises ``WorkerFailure`` if a
        worker is lost meanwhile (the caller recovers as from a failed step)."""
        if self.due(ctl.step):
            self._evaluate(ctl)

    def before_step(self, ctl: Controller) -> None:
        """An evaluation the layout put off (see the module docstring), tried again before the workload's next
        tick; dropped, with a journal line, once an optimizer step has come since (the weights moved on)."""
        if self.pending is None:
            return
        if ctl.step != self.pending:
            self.record(RecordKind.EVAL, text=f"the evaluation of step {self.pending} was not done: no layout that "
                                              "can evaluate came before the next optimizer step")
            self.pending = None
            return
        self._evaluate(ctl)

    def _evaluate(self, ctl: Controller) -> None:
        committed, started = ctl.step, time.perf_counter()
        values = ctl.workload.evaluate(ctl)
        if isinstance(values, str):  # not on this layout: try again before the next tick
            if self.pending != committed:
                self.record(RecordKind.EVAL, text=f"evaluation put off: {values}")
            self.pending = committed
            return
        self.pending = None
        values["eval_runtime"] = time.perf_counter() - started
        step = committed - 1  # metrics.jsonl's step: the 0-based step just completed, whose update was evaluated
        self.history[step] = values
        if self.metrics is not None:
            self.metrics.eval(step, values)
        main = [k for k in ("eval_loss", "eval_reward") if k in values]
        shown = ", ".join(f"{k} {values[k]:.4f}" for k in main)
        self.record(RecordKind.EVAL, text=f"{shown} on {values.get('eval_samples', 0):.0f} held-out rows "
                                          f"({values['eval_runtime']:.2f} s)", **values)
