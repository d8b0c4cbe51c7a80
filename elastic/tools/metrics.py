"""Metrics of a run, written as they happen: JSON lines, plus TensorBoard when it is installed.

A run directory holds ``metrics.jsonl`` (one line per optimizer step: loss, learning rate,
gradient norm, tokens/s, workers, layout; ``time`` in seconds since the run began and ``at`` since the
epoch, both when the step was counted), ``events.jsonl`` (one line per controller event:
reshards, recoveries, decisions, with their times and sizes) and ``summary.json`` at the end.
A step's row also carries ``learning_rate`` (TRL's name for ``lr``) and the workload's own metrics under
TRL's names (GRPO: ``reward``, ``rewards/<func>/mean``, ``kl``, ``entropy``, ...; ``driver/summary.py``);
TensorBoard gets each as ``train/<name>``. A value that is not finite (a reward no function gave) is written
as null, since JSON has no NaN; TRL logs None there too.
An evaluation (``train.eval_every``) adds a row ``{"step", "eval_loss", ...}``
at its step. ``elastic plot RUN_DIR`` turns them into a PNG timeline.
"""

from __future__ import annotations

import json
import logging
import math
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
               "layout": summary.layout, "time": time.time() - self.started, "at": time.time(),
               "learning_rate": summary.lr}
        extra = {k: float(v) if math.isfinite(v) else None for k, v in getattr(summary, "metrics", {}).items()}
        row.update(extra)
        self._steps.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "workers"):
                self._tb.add_scalar(f"train/{key}", row[key], summary.step)
            for key, value in extra.items():
                if value is not None:
                    self._tb.add_scalar(f"train/{key}", value, summary.step)

    def eval(self, step: int, values: dict[str, float]) -> None:
        """An evaluation's row at ``step`` (``eval_loss`` ...; ``control/evaluation.py``); ``read_run`` merges it
        into that step's training row (whose times it leaves alone). Not finite: null, as in ``step``."""
        values = {k: float(v) if math.isfinite(v) else None for k, v in values.items()}
        self._steps.write(json.dumps({"step": step, **values}) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if value is not None:
                    self._tb.add_scalar(f"eval/{key.removeprefix('eval_')}", value, step)

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
    # A replayed step (after a recovery from a snapshot) supersedes its first attempt; an evaluation's row joins
    # its step's row.
    latest: dict[int, dict] = {}
    for row in steps:
        latest[row["step"]] = {**latest.get(row["step"], {}), **row}
    return [latest[k] for k in sorted(latest)], events
