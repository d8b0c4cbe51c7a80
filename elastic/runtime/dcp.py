"""torch.distributed.checkpoint (DCP) save and load of an engine's training tensors, as worker tasks.

This is how torch users checkpoint FSDP2/DTensor training, and it is what the checkpoint-restart
baselines of ``bench/reshard.py`` and ``bench/recovery.py`` use: every rank saves its shards into one
DCP folder, and a job with another layout (another world size) loads them, DCP doing the resharding.
No checksums on either path (DCP and Ray Train verify none by default).

The state dict holds each parameter as the engine holds it (a DTensor of the layout's mesh, or a plain
tensor), and its AdamW moments as DTensors with the parameter's placements built on the optimizer's own
local tensors, so a load writes straight into the optimizer state. The step is the folder's ``step``
file. Our own layout-independent checkpoints are ``core/checkpoint.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from elastic.model.specs import OPT_KEYS
from elastic.runtime.engine import Engine
from elastic.runtime.tasks import TaskContext


def state_dict(engine: Engine) -> dict[str, torch.Tensor]:
    """Parameters and AdamW moments of this rank, as DTensors where the parameters are DTensors."""
    out: dict[str, torch.Tensor] = {name: p.detach() for name, p in engine.named_params}
    for name, p, local in engine.trainable:
        for key in OPT_KEYS:
            moment = engine.optimizer.state[local][key]
            if isinstance(p, DTensor):
                moment = DTensor.from_local(moment, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                            stride=p.stride())
            out[f"{name}::{key}"] = moment
    return out


@dataclass(frozen=True)
class DcpSave:
    """Every rank of the placement saves its shards into ``folder`` (a collective over the placement's group)."""

    folder: str

    def run(self, ctx: TaskContext) -> int:
        dcp.save(state_dict(ctx.engine), checkpoint_id=self.folder, no_dist=not dist.is_initialized())
        if ctx.engine.rank == 0:
            (Path(self.folder) / "step").write_text(str(ctx.engine.step))
        return ctx.engine.step


@dataclass(frozen=True)
class DcpLoad:
    """Every rank of the (new) placement loads its shards from ``folder``, whatever layout saved them."""

    folder: str

    def run(self, ctx: TaskContext) -> int:
        engine = ctx.engine
        with torch.no_grad():
            dcp.load(state_dict(engine), checkpoint_id=self.folder, no_dist=not dist.is_initialized())
        return int((Path(self.folder) / "step").read_text())
