"""Pipeline parallelism with ``torch.distributed.pipelining``.

Each pp rank holds one ``LlamaStage`` (a contiguous run of layers). The schedule splits the
rank's share of the batch into ``layout.microbatches`` equal micro-batches; 1F1B when there are
at least as many micro-batches as stages, GPipe otherwise. Gradients are not rescaled by the
number of micro-batches (``scale_grads=False``): the loss is already normalised globally.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe


def build_schedule(stage_module: nn.Module, stage_index: int, n_stages: int, pp_mesh: DeviceMesh,
                   microbatches: int, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    stage = PipelineStage(stage_module, stage_index, n_stages, torch.device("cpu"), group=pp_mesh.get_group())
    schedule_cls = Schedule1F1B if microbatches >= n_stages else ScheduleGPipe
    return schedule_cls(stage, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
