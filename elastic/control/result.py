"""What a run leaves (``RunResult``), and the summary written to its run directory's ``summary.json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from elastic.core.config import Config
from elastic.core.layout import Placement
from elastic.driver.exporter import ExportReport
from elastic.driver.resharder import ReshardReport
from elastic.driver.snapshots import Snapshotter
from elastic.driver.summary import StepSummary
from elastic.plan.memory import MemoryModel


@dataclass
class RunResult:
    """What a run leaves: its steps, reshards, recoveries and journal, and the final tensors."""

    history: list[StepSummary]
    reshards: list[ReshardReport]
    recoveries: list[dict]
    events: list[dict]
    tensors: dict[str, torch.Tensor] | None
    seconds: float
    final_placement: Placement | None = None
    export: ExportReport | None = None  # what the workers wrote of the model (a controller given ``export_dir``)
    tries: list[StepSummary] = field(default_factory=list)  # every counted step in order, replays too (``StepLog``)

    def model_folders(self, cfg: Config, run_dir: str | Path) -> dict[str, Path]:
        """Where the run's model is: the folders its workers wrote at its end, else (the library API, which
        gathers) the folders written now under ``run_dir`` from the gathered tensors; {} when neither."""
        if self.export is not None:
            return dict(self.export.folders)
        if self.tensors is None:
            return {}
        from elastic.model.export import export_model

        return export_model(run_dir, cfg, self.tensors)


def run_summary(result: RunResult, snapshots: Snapshotter, finished: bool, memory: MemoryModel | None = None) -> dict:
    """The figures ``summary.json`` keeps; ``finished``: every step was done (a re-run says so and stops).
    ``memory``: each layout's predicted peak per worker beside the peak its workers reported."""
    placement = result.final_placement
    return {"steps": len(result.history), "finished": finished,
            "last_step": result.history[-1].step + 1 if result.history else 0, "seconds": result.seconds,
            "final_loss": result.history[-1].loss if result.history else None,
            "final_layout": str(placement.layout) if placement else None,
            "reshards": len(result.reshards), "recoveries": result.recoveries,
            "snapshots": snapshots.taken, "snapshot_stall_s": round(snapshots.stall_total, 3),
            "memory": memory.report() if memory is not None else []}
