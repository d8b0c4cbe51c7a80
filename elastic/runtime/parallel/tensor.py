"""Tensor parallelism with DTensor's Colwise/Rowwise styles, following the model's TP_PLAN.

Column-parallel projections (q, k, v, gate, up) split their output features and hand the
attention/MLP code local shards holding n_heads/tp heads; row-parallel ones (o, down) split
their input features and all-reduce their output. Embedding, norms and the LM head stay
replicated (small with a byte vocabulary). LoRA adapters follow their base layer's split.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from elastic.model.llama import TP_PLAN
from elastic.model.lora import LoRALinear


def _place(module: nn.Module, mesh: DeviceMesh, placement) -> None:
    for name, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(name, nn.Parameter(distribute_tensor(param, mesh, [placement], src_data_rank=None),
                                                     requires_grad=param.requires_grad))


class LoraColwiseParallel(ColwiseParallel):
    """Column-parallel base with its adapter: A replicated, B split on its output (like the base)."""

    PLACEMENTS = {"": Shard(0), "lora_A": Replicate(), "lora_B": Shard(0)}

    def _partition_linear_fn(self, name, module, device_mesh):
        if name in self.PLACEMENTS:
            _place(module, device_mesh, self.PLACEMENTS[name])


class LoraRowwiseParallel(RowwiseParallel):
    """Row-parallel base with its adapter: A split on its input (like the base), B replicated.

    A's partial products are summed by the same all-reduce as the base layer's: B (sum_i A_i x_i)
    = sum_i B A_i x_i, so the adapter adds no communication.
    """

    PLACEMENTS = {"": Shard(1), "lora_A": Shard(1), "lora_B": Replicate()}

    def _partition_linear_fn(self, name, module, device_mesh):
        if name in self.PLACEMENTS:
            _place(module, device_mesh, self.PLACEMENTS[name])


def apply_tensor_parallel(stage: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, str] = TP_PLAN) -> None:
    plain = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    lora = {"colwise": LoraColwiseParallel, "rowwise": LoraRowwiseParallel}
    for layer in stage.model.layers.values():
        styles = {}
        for path, style in plan.items():
            adapted = isinstance(layer.get_submodule(path), LoRALinear)
            styles[path] = (lora if adapted else plain)[style]()
        parallelize_module(layer, tp_mesh, styles)
