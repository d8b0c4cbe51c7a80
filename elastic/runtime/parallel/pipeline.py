"""Pipeline parallelism with ``torch.distributed.pipelining``.

Each pp rank holds one ``LlamaStage`` (a contiguous run of layers). The schedule splits the
rank's share of the batch into ``layout.microbatches`` equal micro-batches; 1F1B when there are
at least as many micro-batches as stages, GPipe otherwise. Gradients are not rescaled by the
number of micro-batches (``scale_grads=False``): the loss is already normalised globally.

Each micro-batch's forward runs inside ``chunk_context(chunk index)``, which names that chunk's rows
for LoRA dropout. The stage overrides ``forward_one_chunk``, the method every schedule calls once per
real micro-batch, in the order ``torch.tensor_split`` cut them; torch's metadata-inference forward
(the first step of a schedule, outputs discarded) does not go through it, so it names no rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe


class _ChunkStage(PipelineStage):
    """A PipelineStage whose micro-batch forwards run inside ``chunk_context(chunk index)``."""

    chunk_context: Callable[[int], contextlib.AbstractContextManager] = staticmethod(
        lambda chunk: contextlib.nullcontext())

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        with self.chunk_context(fwd_chunk_id):
            return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)


def build_schedule(stage_module: nn.Module, stage_index: int, n_stages: int, pp_mesh: DeviceMesh,
                   microbatches: int, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   chunk_context: Callable[[int], contextlib.AbstractContextManager] | None = None):
    stage = _ChunkStage(stage_module, stage_index, n_stages, torch.device("cpu"), group=pp_mesh.get_group())
    if chunk_context is not None:
        stage.chunk_context = chunk_context
    schedule_cls = Schedule1F1B if microbatches >= n_stages else ScheduleGPipe
    return schedule_cls(stage, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
