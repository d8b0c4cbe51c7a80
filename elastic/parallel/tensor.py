"""Tensor parallelism with DTensor's Colwise/Rowwise styles, following the model's TP_PLAN.

Column-parallel projections (q, k, v, gate, up) split their output features and hand the
attention/MLP code local shards holding n_heads/tp heads; row-parallel ones (o, down) split
their input features and all-reduce their output. Embedding, norms and the LM head stay
replicated (small with a byte vocabulary).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from elastic.model.llama import TP_PLAN


def apply_tensor_parallel(stage: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, str] = TP_PLAN) -> None:
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for layer in stage.model.layers.values():
        parallelize_module(layer, tp_mesh, {path: styles[style]() for path, style in plan.items()})
