"""Save and resume layout-independent checkpoints through the worker group (driver side).

Workers write their own shards in parallel into a temporary folder; the driver writes the manifest
and renames the folder into place (see ``elastic.core.checkpoint``). Resuming validates the whole
checkpoint first and only then lets each rank of the new placement, whatever its layout or worker
count, read the slices it needs. Checksums are verified when asked (``verify``): the controller
verifies once, before any worker starts.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from elastic.core import checkpoint as ckpt
from elastic.core.layout import Placement
from elastic.driver.group import WorkerGroup
from elastic.model.specs import training_specs

log = logging.getLogger(__name__)


def save_checkpoint(group: WorkerGroup, root: Path) -> tuple[Path, float]:
    """Write the committed step's tensors to ``root/step_N``; returns (folder, seconds)."""
    started = time.perf_counter()
    cfg, placement, step = group.cfg, group.placement, group.committed
    specs = training_specs(cfg)
    entries = ckpt.writers(placement, specs, cfg.model.n_layers)
    tmp = ckpt.new_folder(Path(root), step)
    files = group.write_shards(tmp, entries)
    folder = ckpt.finalize(tmp, Path(root), step, cfg, specs, [files[w] for w in sorted(files)])
    return folder, time.perf_counter() - started


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
