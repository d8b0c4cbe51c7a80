"""Activation checkpointing recomputes each decoder layer in backward: the weights must not change, bit for bit.

One process, float64, the engine itself with and without ``train.activation_checkpointing``; LoRA with dropout
too, whose mask must come out the same in the recompute. The layouts (dp, fsdp, tp, pp, across a live reshard)
are checked against the independent reference in ``tests/integration/test_equivalence.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from elastic.core.config import LoraConfig
from elastic.core.layout import Layout, Placement
from elastic.model.llama import DecoderLayer
from elastic.runtime.engine import Engine
from tests.helpers import tiny_config


def run(cfg, checkpointing: bool):
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, activation_checkpointing=checkpointing))
    engine = Engine(cfg, Placement(Layout(), (0,)), 0)
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in engine.module.modules()
             if isinstance(m, type(engine.module.model.layers["0"].mlp))]
    losses = [engine.train_step().loss for _ in range(cfg.train.steps)]
    for hook in hooks:
        hook.remove()
    return losses, engine.local_tensors(), len(calls)


@pytest.mark.parametrize("lora", [None, LoraConfig(r=4, alpha=8.0, dropout=0.3)], ids=["full", "lora-dropout"])
def test_checkpointed_layers_give_the_same_weights_bit_for_bit(lora):
    cfg = tiny_config(steps=3).replace(lora=lora)
    plain_losses, plain, plain_calls = run(cfg, False)
    ckpt_losses, ckpt, ckpt_calls = run(cfg, True)
    # The recompute really ran: every layer's MLP ran twice per step (forward, and again in backward).
    n_layers = cfg.model.n_layers
    assert plain_calls == n_layers * cfg.train.steps and ckpt_calls == 2 * plain_calls
    assert plain_losses == ckpt_losses
    assert set(plain) == set(ckpt) and all(torch.equal(plain[k], ckpt[k]) for k in plain)


def test_sampling_with_a_cache_does_not_checkpoint():
    layer = DecoderLayer(tiny_config().model, 0)
    layer.checkpointed = True
    x = torch.randn(1, 3, tiny_config().model.dim, dtype=torch.float32)
    with torch.no_grad():  # inference: nothing to recompute, the plain path runs
        assert torch.equal(layer(x), layer._forward(x, 0, None, None))
