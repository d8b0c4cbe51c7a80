"""Save and resume layout-independent checkpoints with the worker group (driver side).

Workers write their own shards in parallel into a temporary folder; the driver writes the
manifest and renames the folder into place (see ``elastic.core.checkpoint``). Resuming validates the
whole checkpoint first (checksums included) and only then lets each rank of the new placement,
whatever its layout or worker count, read the slices it needs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from elastic.core import checkpoint as ckpt
from elastic.core.layout import Placement
from elastic.driver.ray_group import WorkerGroup
from elastic.model.specs import state_specs

log = logging.getLogger(__name__)


def save_checkpoint(group: WorkerGroup, root: Path) -> tuple[Path, float]:
    """Write the committed state to ``root/step_N``; returns (folder, seconds)."""
    started = time.perf_counter()
    cfg, placement, step = group.cfg, group.placement, group.committed
    specs = state_specs(cfg)
    entries = ckpt.writers(placement, specs, cfg.model.n_layers)
    tmp = ckpt.new_folder(Path(root), step)
    files = group.call_each("save_shard", {w: (str(tmp), entries[w], step) for w in placement.workers if entries[w]})
    folder = ckpt.finalize(tmp, Path(root), step, cfg, specs, [files[w] for w in sorted(files)])
    return folder, time.perf_counter() - started


def resume_checkpoint(group: WorkerGroup, path: Path, placement: Placement, verify: bool = True) -> int:
    """Load the checkpoint at ``path`` (a step folder, or a root with ``latest``) into ``placement``."""
    path = Path(path)
    folder = path if (path / "manifest.json").is_file() else ckpt.latest(path)
    checkpoint = ckpt.open_checkpoint(folder, group.cfg, state_specs(group.cfg), verify=verify)
    name = group.next_group_name()
    group.call_each("load_checkpoint", {w: (placement, name, str(folder)) for w in placement.workers},
                    forming=name)
    group.placement, group.committed = placement, checkpoint.step
    log.info("resumed %s at step %d on %s", folder, checkpoint.step, placement)
    return checkpoint.step
