"""The chunked LM loss (``model/loss.py``): the same loss and gradients as the logits computed whole, in float64,
and the engine's LoRA step leaves frozen tensors without gradients (what its memory depends on)."""

from __future__ import annotations

import torch

from elastic.core.config import LoraConfig
from elastic.core.layout import Layout, Placement
from elastic.model import loss as loss_module
from elastic.model.llama import LlamaStage
from elastic.model.loss import causal_lm_loss_sum, chunk_positions, lm_loss_sum
from elastic.runtime.engine import Engine
from tests.helpers import tiny_config


def _grads(fn, *leaves):
    for t in leaves:
        t.grad = None
    out = fn()
    out.backward()
    return out.detach(), [t.grad.clone() for t in leaves]


def test_chunked_loss_equals_whole_loss_and_gradients():
    torch.manual_seed(0)
    vocab, dim = 11, 5
    hidden = torch.randn(3, 7, dim, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, dim, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (3, 7))
    labels[0, :2] = labels[2, 5] = -100
    calls = []

    def head(h):
        calls.append(len(h))
        return torch.nn.functional.linear(h, weight)

    whole, whole_grads = _grads(lambda: causal_lm_loss_sum(head(hidden), labels), hidden, weight)
    calls.clear()
    chunk_bytes = 4 * 4 * vocab  # 4 positions per chunk: 21 positions make 6 chunks, the last one short
    assert chunk_positions(vocab, chunk_bytes) == 4
    chunked, chunked_grads = _grads(lambda: lm_loss_sum(hidden, head, vocab, labels, chunk_bytes), hidden, weight)
    assert sorted(calls) == [1, 1] + [4] * 10  # each chunk's head once in forward, once recomputed in backward
    assert abs(float(chunked - whole)) <= 1e-12 * abs(float(whole))
    for a, b in zip(chunked_grads, whole_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_stage_loss_with_labels_equals_loss_of_logits(monkeypatch):
    cfg = tiny_config()
    torch.manual_seed(0)
    stage = LlamaStage(cfg.model).double()
    x = torch.randint(0, cfg.model.vocab_size, (2, 9))
    y = torch.roll(x, -1, 1)
    y[:, -1] = -100
    whole, whole_grads = _grads(lambda: causal_lm_loss_sum(stage(x), y), *stage.parameters())
    monkeypatch.setattr(loss_module, "CHUNK_LOGIT_BYTES", 5 * 4 * cfg.model.vocab_size)  # 18 positions: 4 chunks
    chunked, chunked_grads = _grads(lambda: stage(x, labels=y), *stage.parameters())
    assert abs(float(chunked - whole)) <= 1e-12 * abs(float(whole))
    for a, b in zip(chunked_grads, whole_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_lora_step_leaves_frozen_tensors_without_gradients():
    cfg = tiny_config(steps=2)
    cfg = cfg.replace(lora=LoraConfig(r=4, alpha=8.0))
    engine = Engine(cfg, Placement(Layout(), (0,)), 0)
    engine.compute()  # gradients exist between the backward and the update
    frozen = [(n, p) for n, p in engine.module.named_parameters() if not p.requires_grad]
    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    assert frozen and trainable and all(".lora_" in n for n, _ in trainable)
    assert [n for n, p in frozen if p.grad is not None] == []
    assert all(p.grad is not None for _, p in trainable)
    engine.apply()
    assert [n for n, p in engine.module.named_parameters() if p.grad is not None] == []
