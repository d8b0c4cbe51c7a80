"""One optimizer step as the driver saw it: the per-rank results of a step combined into a summary."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from elastic.core.layout import Placement
from elastic.runtime.engine import StepResult


@dataclass
class StepSummary:
    """One optimizer step as the driver saw it, combined over ranks."""

    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    seconds: float
    workers: int
    layout: str
    samples: list[int] = field(default_factory=list)  # what the ranks report they trained on, in data order
    ended: float = 0.0  # time.perf_counter() on the driver when the step's results were all in


def summarize(results: dict[int, StepResult], placement: Placement, seconds: float) -> StepSummary:
    """Combine per-rank results: losses add up over data-parallel ranks (tp rank 0 of the last stage); the
    samples the first stage's tp-rank-0 ranks report are concatenated in rank order, which is data order
    (sample j of the step is position step * global_batch + j)."""
    layout = placement.layout
    loss, samples, any_result = 0.0, [], None
    for rank, worker in enumerate(placement.workers):
        r = results[worker]
        any_result = r
        c = layout.coord(rank)
        if c.tp == 0 and r.loss is not None:
            loss += r.loss
        if c.tp == 0 and c.pp == 0:
            samples.extend(r.samples)
    return StepSummary(step=any_result.step, loss=loss, grad_norm=any_result.grad_norm, lr=any_result.lr,
                       tokens=any_result.tokens, seconds=seconds, workers=layout.world, layout=str(layout),
                       samples=samples, ended=time.perf_counter())
