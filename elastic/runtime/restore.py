"""Where a worker rebuilds its shards from when no live peer holds them: a snapshot or a checkpoint.

A source is a small value the driver sends with ``Worker.restore``; its ``read`` runs inside the worker and
returns this rank's tensors (name -> local tensor of the rank's box) and the step they hold. Only the pieces
that overlap the rank's boxes are fetched or read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from elastic.core import checkpoint as ckpt
from elastic.core.boxes import Box, box_shape, copy_overlap, intersect
from elastic.core.config import Config
from elastic.core.layout import Placement
from elastic.model.specs import rank_boxes, training_specs


@dataclass(frozen=True)
class FromSnapshot:
    """A snapshot of ``placement`` at ``step``: old worker -> [its part's object ref] (in a list, so that Ray
    passes the ref itself and the worker fetches only the parts it needs)."""

    placement: Placement
    parts: dict[int, list[Any]]
    step: int

    def read(self, cfg: Config, boxes: dict[str, Box], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], int]:
        tensors = {name: torch.empty(box_shape(box), dtype=dtype) for name, box in boxes.items()}
        for worker in self.placement.workers:
            theirs = rank_boxes(cfg, self.placement, worker)
            if not any(intersect(theirs[n], b) for n, b in boxes.items() if n in theirs):
                continue
            step, _, snapped = ray.get(self.parts[worker][0])
            if step != self.step:
                raise RuntimeError(f"snapshot part of worker {worker} is at step {step}, not {self.step}")
            for name, box in boxes.items():
                if name in theirs:
                    copy_overlap(tensors[name], box, snapped[name], theirs[name])
        return tensors, self.step


@dataclass(frozen=True)
class FromCheckpoint:
    """An on-disk checkpoint folder (validated by the driver before it was named)."""

    folder: str

    def read(self, cfg: Config, boxes: dict[str, Box], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], int]:
        checkpoint = ckpt.open_checkpoint(Path(self.folder), cfg, training_specs(cfg), verify=False)
        return ckpt.read_boxes(checkpoint, boxes, dtype), checkpoint.step
