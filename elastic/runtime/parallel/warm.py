"""Warm a fresh worker process: everything a first engine build and step would do once.

A new Ray actor spends seconds importing torch, then more on its first FSDP/DTensor build and
its first step (lazy imports, dispatcher caches, dataset loading). Doing that here, on a private
one-rank gloo group set and a tiny model, while the job keeps training, means that when the worker
joins a reshard only the state transfer stalls training.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from elastic.core.config import Config, ModelConfig
from elastic.core.data import build_dataset
from elastic.core.layout import Layout
from elastic.runtime.parallel.abort import GlooSockets
from elastic.runtime.parallel.connections import set_default_group
from elastic.runtime.parallel.fsdp import apply_fsdp, data_mesh
from elastic.runtime.parallel.groups import LayoutGroups
from elastic.runtime.parallel.tensor import apply_tensor_parallel
from elastic.runtime.parallel.vocab import shard_vocabulary

TINY = ModelConfig(vocab_size=259, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16, max_seq_len=16)


def warm_up(cfg: Config) -> None:
    build_dataset(cfg.data, cfg.train.seed)  # the corpus read is cached per process
    if dist.is_initialized():
        return  # already part of a group: nothing left to warm
    from elastic.model.llama import LlamaStage, causal_lm_loss_sum

    groups = LayoutGroups(dist.HashStore(), "warm-up", 0, Layout(), 30.0, GlooSockets())
    groups.activate()
    try:
        model = LlamaStage(dataclasses.replace(TINY)).to(torch.float32)
        apply_tensor_parallel(model, groups.mesh["tp"])
        mesh = data_mesh(groups.mesh)
        apply_fsdp(model, mesh, ignored=shard_vocabulary(model, mesh))  # as an fsdp engine builds (one rank here)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, 256, (1, 8))
        (model(x, labels=x) + causal_lm_loss_sum(model(x), x)).backward()  # the loss path and the logits path
        opt.step()
    finally:
        set_default_group(None)
        groups.close()
