"""The run's journal: every thing that happened, as one entry each (kinds in ``core/records.py``).

``record`` appends the entry, writes it to the run directory's ``events.jsonl`` (when the run has one),
logs it on the ``elastic`` logger (one line, printed above the progress bar; see
``tools/progress.py``) and calls the listeners, which is how tests and the control plane watch a run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from elastic.core.records import RecordKind
from elastic.tools.metrics import MetricsWriter

log = logging.getLogger("elastic.control")


class Journal:
    def __init__(self, metrics: MetricsWriter | None = None, started: float | None = None) -> None:
        self.metrics = metrics
        self.started = time.perf_counter() if started is None else started
        self.entries: list[dict] = []
        self.listeners: list[Callable[[dict], None]] = []

    def record(self, kind: RecordKind, step: int, level: int = logging.INFO, **details) -> dict:
        entry = {"kind": kind.value, "step": step, "time": time.perf_counter() - self.started, **details}
        self.entries.append(entry)
        if self.metrics is not None:
            self.metrics.event(entry)
        text = details.get("text") or ", ".join(f"{k}={v}" for k, v in details.items())
        log.log(level, "[step %d] %s: %s", step, kind.value, text)
        for listener in self.listeners:
            listener(entry)
        return entry

    def of(self, kind: RecordKind) -> list[dict]:
        return [e for e in self.entries if e["kind"] == kind.value]
