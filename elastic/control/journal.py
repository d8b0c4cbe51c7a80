"""The run's journal: every thing that happened, as one entry each (kinds in ``core/records.py``).

``record`` appends the entry, writes it to the run directory's ``events.jsonl`` (when the run has one)
and logs it on the ``elastic`` logger (one line, printed above the progress bar; see
``tools/progress.py``). Tests read ``entries``; the controller's own listeners hear its transitions.
"""

from __future__ import annotations

import logging
import time

from elastic.core.records import RecordKind
from elastic.tools.metrics import MetricsWriter

log = logging.getLogger("elastic.control")


class Journal:
    def __init__(self, metrics: MetricsWriter | None = None, started: float | None = None) -> None:
        self.metrics = metrics
        self.started = time.perf_counter() if started is None else started
        self.entries: list[dict] = []

    def record(self, kind: RecordKind, step: int, level: int = logging.INFO, **details) -> dict:
        entry = {"kind": kind.value, "step": step, "time": time.perf_counter() - self.started, **details}
        self.entries.append(entry)
        if self.metrics is not None:
            self.metrics.event(entry)
        text = details.get("text") or ", ".join(f"{k}={v}" for k, v in details.items())
        log.log(level, "[step %d] %s: %s", step, kind.value, text)
        return entry
