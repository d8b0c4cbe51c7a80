"""Tensor parallelism with DTensor's Colwise/Rowwise styles, following the model's TP_PLAN.

Column-parallel projections (q, k, v, gate, up) split their output features and hand the
attention/MLP code local shards holding n_heads/tp heads; row-parallel ones (o, down) split
their input features and all-reduce their output. Embedding, norms and the LM head stay
replicated (small with a byte vocabulary). LoRA adapters follow their base layer's split:

- column-parallel base: A replicated, B split on its output (like the base);
- row-parallel base: A split on its input (like the base), B replicated. A's partial products are
  summed by the same all-reduce as the base layer's: B (sum_i A_i x_i) = sum_i B A_i x_i, so the
  adapter adds no communication.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from elastic.model.llama import TP_PLAN
from elastic.model.lora import LoRALinear
from elastic.runtime.torch_compat import placed_linear_style

PLAIN = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
LORA_PLACEMENTS = {  # "" is the base weight; lora_A / lora_B the adapter's child modules
    "colwise": {"": Shard(0), "lora_A": Replicate(), "lora_B": Shard(0)},
    "rowwise": {"": Shard(1), "lora_A": Shard(1), "lora_B": Replicate()},
}


def apply_tensor_parallel(stage: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, str] = TP_PLAN) -> None:
    for layer in stage.model.layers.values():
        styles = {}
        for path, style in plan.items():
            if isinstance(layer.get_submodule(path), LoRALinear):
                styles[path] = placed_linear_style(PLAIN[style], LORA_PLACEMENTS[style])
            else:
                styles[path] = PLAIN[style]()
        parallelize_module(layer, tp_mesh, styles)
