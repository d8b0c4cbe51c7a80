"""The engine at world 1 against the independent reference (``tests/reference.py``), in float64.

One process, no Ray: the quickest check that the engine's data cursor, loss, AdamW, clipping, LR
schedule and LoRA agree with plain torch and PEFT. Layout invariance is the integration tests' job.
"""

from __future__ import annotations

import pytest

from elastic.core.config import LoraConfig
from elastic.core.layout import Layout, Placement
from elastic.runtime.engine import Engine
from tests.helpers import tiny_config, worst_state_err
from tests.reference import train_reference


@pytest.mark.parametrize("lora", [None, LoraConfig(r=4, alpha=8.0)], ids=["full", "lora"])
def test_engine_at_world_one_equals_the_reference(lora):
    cfg = tiny_config(steps=8).replace(lora=lora)
    engine = Engine(cfg, Placement(Layout(), (0,)), 0)
    losses = [engine.train_step().loss for _ in range(cfg.train.steps)]
    ref = train_reference(cfg)
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, ref.losses, strict=True)) <= 1e-9
    err, name = worst_state_err(engine.local_tensors(), ref.tensors)
    assert err <= 1e-9, f"{name}: {err:.2e}"
