"""Metrics of a run, written as they happen: JSON lines, plus TensorBoard when it is installed.

A run directory holds ``metrics.jsonl`` (one line per optimizer step: loss, learning rate,
gradient norm, tokens/s, workers, layout; ``time`` in seconds since the run began and ``at`` since the
epoch, both when the step was counted), ``events.jsonl`` (one line per controller event:
reshards, recoveries, decisions, with their times and sizes) and ``summary.json`` at the end.
``elastic plot RUN_DIR`` turns them into a PNG timeline.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, run_dir: str | Path, append: bool = False) -> None:
        """A new run overwrites the directory's files; a resumed one (``append``) continues them."""
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        mode = "a" if append else "w"
        self._steps = open(self.dir / "metrics.jsonl", mode, buffering=1)
        self._events = open(self.dir / "events.jsonl", mode, buffering=1)
        self._tb = None
        try:  # optional: TensorBoard event files when the package is there
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))
        except Exception:  # noqa: BLE001 - tensorboard missing or broken: JSONL is enough
            self._tb = None

    def step(self, summary) -> None:
        row = {"step": summary.step, "loss": summary.loss, "lr": summary.lr, "grad_norm": summary.grad_norm,
               "tokens": summary.tokens, "seconds": summary.seconds,
               "tokens_per_s": summary.tokens / max(summary.seconds, 1e-9), "workers": summary.workers,
               "layout": summary.layout, "time": time.time() - self.started, "at": time.time()}
        self._steps.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "workers"):
                self._tb.add_scalar(f"train/{key}", row[key], summary.step)

    def event(self, entry: dict) -> None:
        row = {k: v for k, v in entry.items() if isinstance(v, (str, int, float, bool, list, type(None)))}
        row["wall"] = time.time() - self.started
        self._events.write(json.dumps(row) + "\n")

    def summary(self, data: dict) -> None:
        (self.dir / "summary.json").write_text(json.dumps(data, indent=1))

    def close(self) -> None:
        self._steps.close()
        self._events.close()
        if self._tb is not None:
            self._tb.close()


def read_run(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(steps, events) of a run directory; raises ValueError if it holds no metrics."""
    run = Path(run_dir)
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run} has no metrics.jsonl; pass a run directory written by `elastic train`")
    steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    events_path = run / "events.jsonl"
    events = [json.loads(line) for line in events_path.read_text().splitlines() if line.strip()] \
        if events_path.is_file() else []
    # A replayed step (after a recovery from a snapshot) supersedes its first attempt.
    latest = {}
    for row in steps:
        latest[row["step"]] = row
    return [latest[k] for k in sorted(latest)], events
