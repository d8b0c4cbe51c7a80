"""The end of a run's model, written where its state lives: the workers write the weights, the driver the rest.

``export_from_workers`` plans the export (``model/export.plan_export``), names one writer rank per weights
file (the rank that holds most of the file's bytes, so the fewest bytes travel; ties go to the rank with the
least to write so far), and runs ``runtime/export.WriteExport`` on every rank of the placement: the
writers assemble each tensor from its holders over the placement's gloo world and stream it to their file.
The driver writes only the side files (config.json, the index of a split folder, adapter_config.json, the
tokenizer copies). So the driver receives no tensor, and no worker holds more than about one tensor
beyond its own shards.

Where the files go: the output folder must be one path every writer's machine sees, as for checkpoints (the
run directory on a filesystem every node mounts, or one machine). The driver checks it first: it leaves a
marker file in the folder and asks each worker whether it sees it. If some do not, the export falls back to
the driver writing the files itself, one tensor at a time: each entry is assembled on its writer as above
and handed to the driver through Ray's object store, so the driver still holds one tensor at a time.

``driver_bytes`` in the report is what the group counted in the call results it received meanwhile
(``WorkerGroup.received_bytes``): the test's measure that the driver never held the state.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from elastic.core.boxes import box_numel
from elastic.core.config import Config
from elastic.driver.group import WorkerGroup
from elastic.model import export
from elastic.model.export import ExportPlan, file_writer, plan_export, write_side_files
from elastic.model.hf import INDEX_NAME
from elastic.model.peft_io import ADAPTER_WEIGHTS
from elastic.model.specs import training_specs
from elastic.runtime.export import SeesFile, WriteExport

log = logging.getLogger(__name__)


@dataclass
class ExportReport:
    """What an export wrote: ``folders`` ({"adapter" | "merged" | "base" | "model": folder}), each file's writer
    worker (None: the driver, in the fallback), the tensor bytes written, the bytes the driver received, the
    largest single tensor's bytes (the bound the driver keeps to), and the seconds it took."""

    folders: dict[str, Path]
    writers: dict[str, int | None]
    written_bytes: int
    driver_bytes: int
    largest_bytes: int
    seconds: float


def choose_writers(plan: ExportPlan, cfg: Config, placement) -> tuple[int, ...]:
    """The rank that writes each of ``plan``'s files: the one holding most of its sources' elements."""
    specs = {s.name: s for s in training_specs(cfg)}
    world, n_layers = placement.layout.world, cfg.model.n_layers
    assigned = [0] * world
    out = []
    for file in plan.files:
        held = [0] * world
        for name in {s for e in file.entries for s in e.sources}:
            for rank in range(world):
                box = placement.box(specs[name], rank, n_layers)
                held[rank] += box_numel(box) if box is not None else 0
        writer = max(range(world), key=lambda r: (held[r], -assigned[r], -r))
        assigned[writer] += sum(box_numel(tuple((0, n) for n in e.shape)) for e in file.entries)
        out.append(writer)
    return tuple(out)


def _clear(plan: ExportPlan) -> None:
    """Weights files an earlier export left in the folders (transformers prefers a single model.safetensors
    over an index, so a stale one would shadow the new files)."""
    for folder in plan.folders.values():
        for stale in (*folder.glob("model*.safetensors"), folder / INDEX_NAME, folder / ADAPTER_WEIGHTS):
            stale.unlink(missing_ok=True)


def _blind(group: WorkerGroup, workers: list[int], folder: Path) -> dict[int, str]:
    """Workers whose machine does not see ``folder`` (worker -> its host)."""
    marker = folder / f".export-probe-{uuid.uuid4().hex[:8]}"
    marker.write_text("elastic")
    try:
        seen = group.run({w: SeesFile(str(marker)) for w in workers})
    finally:
        marker.unlink(missing_ok=True)
    return {w: host for w, (host, sees) in seen.items() if not sees}


def export_from_workers(group: WorkerGroup, cfg: Config, run_dir: str | Path, how: str | None = None,
                        max_shard_size: int | str | None = None) -> ExportReport:
    """Write the model of the group's committed state under ``run_dir`` (``model/export.py``'s folders) from the
    workers; ``max_shard_size``: where an HF folder is split (default ``model.export.MAX_SHARD_SIZE``). Raises
    ``WorkerFailure`` if a worker dies (the caller recovers and exports again)."""
    started, received = time.perf_counter(), group.received_bytes
    placement = group.placement
    if placement is None:
        raise RuntimeError("no placement holds the state: nothing to export")
    plan = plan_export(run_dir, cfg, how, max_shard_size=max_shard_size or export.MAX_SHARD_SIZE)
    writers = choose_writers(plan, cfg, placement)
    for folder in plan.folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    _clear(plan)
    blind = _blind(group, placement.workers, Path(run_dir))
    tasks = {w: WriteExport(plan, writers) for w in placement.workers}
    if not blind:
        results = group.run(tasks)
        written = sum(r["bytes"] for r in results.values())
        by = {str(f.path): placement.workers[writers[i]] for i, f in enumerate(plan.files)}
    else:
        log.warning("workers %s (on %s) do not see %s, so the driver writes the model files itself, one tensor at "
                    "a time; put the run directory on a filesystem every node mounts to have the workers write them",
                    sorted(blind), sorted(set(blind.values())), run_dir)
        written, by = _through_driver(group, plan, writers, tasks), {str(f.path): None for f in plan.files}
    write_side_files(plan, cfg)
    largest = max(box_numel(tuple((0, n) for n in e.shape)) for f in plan.files for e in f.entries)
    return ExportReport(dict(plan.folders), by, written, group.received_bytes - received,
                        largest * plan.dtype.itemsize, time.perf_counter() - started)


def _through_driver(group: WorkerGroup, plan: ExportPlan, writers: tuple[int, ...], tasks: dict) -> int:
    """The fallback: every entry assembled on its writer rank and handed to the driver, which writes it."""
    placement, written = group.placement, 0
    for index, file in enumerate(plan.files):
        out, worker = file_writer(plan, file), placement.workers[writers[index]]
        for number, entry in enumerate(file.entries):
            one = {w: WriteExport(plan, writers, (index, number)) for w in tasks}
            written += out.write(entry.key, group.run(one)[worker])
        out.close()
    return written

