"""Save and resume layout-independent checkpoints through the worker group (driver side).

``CheckpointWriter`` writes a checkpoint while training goes on: every worker that writes a box copies its
shards (the stall, a memory copy), then writes them from the copy on its io thread, fsynced, into a
temporary folder named for this job; once every write is done the driver writes the manifest and renames
the folder into place (see ``elastic.core.checkpoint``), then keeps only the newest ``keep``. A write whose
worker dies is dropped with its folder; the previous checkpoint stays the latest. ``save_checkpoint`` does
the same and waits (the end of a run, tests).

Resuming validates the whole checkpoint first and only then lets each rank of the new placement, whatever
its layout or worker count, read the slices it needs. Checksums are verified when asked (``verify``): the
controller verifies once, before any worker starts.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from elastic.core import checkpoint as ckpt
from elastic.core.layout import Placement
from elastic.driver.group import WorkerFailure, WorkerGroup
from elastic.model.specs import training_specs

log = logging.getLogger(__name__)


class CheckpointWriter:
    def __init__(self, group: WorkerGroup, root: Path, writer: str, keep: int) -> None:
        self.group, self.root, self.writer, self.keep = group, Path(root), writer, keep
        self.inflight: tuple[int, Path, Any, float] | None = None  # (step, temporary folder, writes, started)
        self.stall_total = 0.0

    def begin(self) -> float:
        """Copy the committed step's shards (the stall, returned in seconds) and start writing them."""
        group, started = self.group, time.perf_counter()
        cfg, step = group.cfg, group.committed
        entries = ckpt.writers(group.placement, training_specs(cfg), cfg.model.n_layers)
        tmp = ckpt.new_folder(self.root, step, self.writer)
        try:
            group.checkpoint_copy(entries)
        except WorkerFailure:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        stall = time.perf_counter() - started
        self.stall_total += stall
        self.inflight = (step, tmp, group.checkpoint_write(tmp, entries), started)
        return stall

    def poll(self, wait_s: float = 0.0) -> tuple[Path, float] | None:
        """(folder, seconds) once the checkpoint in flight is complete and in place; None before. A writer lost
        meanwhile drops this checkpoint and raises ``WorkerFailure``."""
        if self.inflight is None:
            return None
        step, tmp, writes, started = self.inflight
        live = self.group.live()
        try:
            files = self.group.checkpoint_written(writes, wait_s)
        except WorkerFailure as failure:
            self.inflight = None
            shutil.rmtree(tmp, ignore_errors=True)
            if set(failure.dead) & live or failure.failed:  # a new loss: the caller recovers
                raise
            log.info("checkpoint of step %d dropped: its writer(s) %s were lost before it was done", step,
                     sorted(failure.dead))
            return None
        if files is None:
            return None
        self.inflight = None
        cfg = self.group.cfg
        folder = ckpt.finalize(tmp, self.root, step, cfg, training_specs(cfg), [files[w] for w in sorted(files)])
        ckpt.sweep(self.root, self.writer)
        ckpt.prune(self.root, self.keep)
        return folder, time.perf_counter() - started

    def wait(self) -> tuple[Path, float] | None:
        """Finish the checkpoint in flight, if any."""
        while self.inflight is not None:
            done = self.poll(wait_s=1.0)
            if done is not None:
                return done
        return None


def save_checkpoint(group: WorkerGroup, root: Path, writer: str = "driver", keep: int = 0) -> tuple[Path, float]:
    """Write the committed step's tensors to ``root/step_N`` and wait; returns (folder, seconds). ``keep`` > 0
    deletes all but the newest ``keep``."""
    out = CheckpointWriter(group, root, writer, keep)
    out.begin()
    return out.wait()


def checkpoint_folder(path: Path) -> Path:
    """A step folder as given, or the newest complete checkpoint under a checkpoint root."""
    path = Path(path)
    return path if (path / "manifest.json").is_file() else ckpt.latest(path)


def resume_checkpoint(group: WorkerGroup, path: Path, placement: Placement, verify: bool = True) -> int:
    """Load the checkpoint at ``path`` (a step folder, or a root with ``latest``) into ``placement``."""
    folder = checkpoint_folder(path)
    checkpoint = ckpt.open_checkpoint(folder, group.cfg, training_specs(group.cfg), verify=verify)
    group.load_checkpoint(folder, placement, checkpoint.step)
    log.info("resumed %s at step %d on %s", folder, checkpoint.step, placement)
    return checkpoint.step
