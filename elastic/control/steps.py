"""The run's committed steps as the driver sees them: history, metrics lines, step calibration, progress bar.

``StepLog.count`` takes one committed step's per-rank results: it keeps the summary (a replayed step
replaces its first try, so the history holds each step once), writes its ``metrics.jsonl`` line, lets the
cost model learn the step time (not from a placement's first step, which pays one-off costs) and the memory
model the step's peak (from every step: a first step's peak is a peak too), and moves the progress bar.
``tries`` keeps every counted step as the ranks reported it, first tries and replays alike, in order: the
tests' exactly-once ledger reads it (a step applied twice shows there, not in the history).
"""

from __future__ import annotations

import time

from elastic.core.layout import Placement
from elastic.driver.summary import StepSummary, summarize
from elastic.plan.costmodel import CostModel
from elastic.plan.memory import MemoryModel
from elastic.tools.metrics import MetricsWriter
from elastic.tools.progress import describe, progress_bar


class StepLog:
    def __init__(self, cost: CostModel, metrics: MetricsWriter | None, memory: MemoryModel | None = None) -> None:
        self.cost, self.metrics, self.memory = cost, metrics, memory
        self.history: list[StepSummary] = []
        self.tries: list[StepSummary] = []  # every count, before a replay replaces its first try in ``history``
        self.bar = None

    def count(self, results: dict, placement: Placement, started: float, fresh: bool, committed: int) -> None:
        """Record the step whose per-rank ``results`` came back (timed from ``started``); ``committed``: the job's
        committed steps after it."""
        summary = summarize(results, placement, time.perf_counter() - started)
        self.tries.append(summary)
        while self.history and self.history[-1].step >= summary.step:  # a replayed step replaces its first try
            self.history.pop()  # (from the end: a step in place of a copy of the whole history per step)
        self.history.append(summary)
        if self.metrics is not None:
            self.metrics.step(summary)
        if not fresh:  # a placement's first step pays one-off costs; do not calibrate on it
            self.cost.observe_step(placement.layout, summary.seconds)
        if self.memory is not None:
            self.memory.observe(placement.layout, summary.peak_bytes)
        if self.bar is not None:
            self.bar.set_postfix(describe(summary), refresh=False)
            self.bar.n = committed
            self.bar.refresh()

    def open_bar(self, total: int, initial: int, show: bool) -> None:
        self.bar = progress_bar(total, initial=initial, disable=not show)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
