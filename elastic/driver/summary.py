"""One optimizer step as the driver saw it: the per-rank results of a step combined into a summary.

A workload's metrics reach ``metrics.jsonl`` in two ways. A rank reports ``StepResult.metrics`` as
``name -> (sum, count)`` over its own rows; the summary adds each data shard's pair once (tp rank 0 of the
last stage, as for the loss) and divides, so the value is the global mean for any layout. A workload that
computes metrics on the driver (GRPO's rewards and completion lengths, from the whole rollout batch) returns
its results as ``StepResults``, which carries them as finished values.
"""

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
    metrics: dict[str, float] = field(default_factory=dict)  # a workload's own, by TRL's names (e.g. GRPO's reward)
    peak_bytes: int = 0  # the largest peak RSS above idle a rank reported for the step (0: not known)


class StepResults(dict):
    """Per-worker ``StepResult``s of one step, plus ``metrics`` the driver computed for it (finished values)."""

    def __init__(self, results: dict[int, StepResult], metrics: dict[str, float]) -> None:
        super().__init__(results)
        self.metrics = dict(metrics)


def summarize(results: dict[int, StepResult], placement: Placement, seconds: float) -> StepSummary:
    """Combine per-rank results: losses and metric (sum, count) pairs add up over data-parallel ranks (tp rank
    0 of the last stage); the samples the first stage's tp-rank-0 ranks report are concatenated in rank order,
    which is data order (sample j of the step is position step * global_batch + j)."""
    layout = placement.layout
    loss, samples, any_result, pairs = 0.0, [], None, {}
    for rank, worker in enumerate(placement.workers):
        r = results[worker]
        any_result = r
        c = layout.coord(rank)
        if c.tp == 0 and r.loss is not None:
            loss += r.loss
            for name, (total, count) in r.metrics.items():
                summed = pairs.get(name, (0.0, 0.0))
                pairs[name] = (summed[0] + total, summed[1] + count)
        if c.tp == 0 and c.pp == 0:
            samples.extend(r.samples)
    metrics = {name: total / max(count, 1.0) for name, (total, count) in pairs.items()}  # TRL clamps the count
    metrics.update(getattr(results, "metrics", {}))
    return StepSummary(step=any_result.step, loss=loss, grad_norm=any_result.grad_norm, lr=any_result.lr,
                       tokens=any_result.tokens, seconds=seconds, workers=layout.world, layout=str(layout),
                       samples=samples, ended=time.perf_counter(), metrics=metrics,
                       peak_bytes=max((r.peak_bytes for r in results.values()), default=0))
