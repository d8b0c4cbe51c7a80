"""An export's weights files written by the workers from their own shards, one tensor at a time.

The driver plans the export (``model/export.plan_export``: files of entries) and names one rank per file,
its writer (``driver/exporter.py``). Every rank of the placement runs ``WriteExport`` and walks the same
files and entries in the same order; for each of an entry's source tensors, the ranks holding a piece of it
send that piece to the file's writer (point to point on the placement's gloo world, the default group of the
task's thread), which assembles the whole tensor, computes the entry (a copy, or a LoRA merge) and appends it
to its file (``model/safetensors_stream``). So a writer holds about one tensor (a merge: W, A, B and the
float64 sum), a non-writer one piece, and the driver nothing. Why blocking sends in one fixed order: every
pair's send and receive then meet in the same place of the walk, so no rank waits on one that waits on it.

Which piece comes from whom: each distinct box of a tensor once (replicas are not sent twice), from the writer
itself when it holds that box, else from the lowest rank that does, as checkpoints choose their writers.

``only`` (file, entry) makes the writer return that one entry's tensor instead of writing it: the fallback for
writers that cannot reach the output folder, where the driver writes the files one received tensor at a time.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from elastic.core.boxes import Box, box_numel, box_shape, slices
from elastic.core.layout import Placement, TensorSpec
from elastic.model.export import ExportPlan, entry_tensor, file_writer
from elastic.runtime.tasks import TaskContext


def pieces(placement: Placement, spec: TensorSpec, n_layers: int, writer: int) -> list[tuple[int, Box]]:
    """(rank that sends it, box) for each distinct non-empty box of ``spec``: the writer's own, else the lowest
    rank's."""
    source: dict[Box, int] = {}
    for rank in range(placement.layout.world):
        box = placement.box(spec, rank, n_layers)
        if box is not None and box_numel(box) > 0 and (box not in source or rank == writer):
            source[box] = rank
    return [(rank, box) for box, rank in source.items()]


@dataclass(frozen=True)
class WriteExport:
    """This rank's part of writing ``plan``'s files; ``writers``: the rank that writes each file (see the module
    docstring). Returns {"files": [paths this rank wrote], "bytes": their tensor bytes}, or with ``only`` the
    entry's tensor on its writer (None elsewhere)."""

    plan: ExportPlan
    writers: tuple[int, ...]
    only: tuple[int, int] | None = None

    def run(self, ctx: TaskContext):
        engine = ctx.engine
        local, rank = engine.local_tensors(), engine.rank
        n_layers, dtype = engine.cfg.model.n_layers, self.plan.dtype

        def gather(name: str, writer: int) -> torch.Tensor | None:
            out = torch.empty(engine.specs[name].shape, dtype=dtype) if rank == writer else None
            for src, box in pieces(engine.placement, engine.specs[name], n_layers, writer):
                if src == rank == writer:
                    out[slices(box)] = local[name]
                elif rank == writer:
                    piece = torch.empty(box_shape(box), dtype=dtype)
                    dist.recv(piece, src=src)
                    out[slices(box)] = piece
                elif src == rank:
                    dist.send(local[name].to(dtype).contiguous(), dst=writer)
            return out

        files, written = [], 0
        for index, file in enumerate(self.plan.files):
            writer = self.writers[index]
            out = file_writer(self.plan, file) if rank == writer and self.only is None else None
            for number, entry in enumerate(file.entries):
                if self.only is not None and self.only != (index, number):
                    continue
                got = {name: gather(name, writer) for name in entry.sources}
                if rank != writer:
                    continue
                tensor = entry_tensor(self.plan, entry, got.__getitem__)
                if self.only is not None:
                    return tensor
                written += out.write(entry.key, tensor)
                del got, tensor  # one entry's tensors at a time
            if out is not None:
                out.close()
                files.append(str(file.path))
        return None if self.only is not None else {"files": files, "bytes": written}


@dataclass(frozen=True)
class SeesFile:
    """Whether this worker's machine sees ``path`` (the driver's marker in the output folder): (host, bool)."""

    path: str
    needs_engine = False

    def run(self, ctx: TaskContext) -> tuple[str, bool]:
        return socket.gethostname(), os.path.isfile(self.path)
