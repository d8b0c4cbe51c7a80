"""``parallel/vocab._Head``: the LM head's matmul under autocast without keeping autocast's weight copy, against
``F.linear`` under ``torch.autocast`` (one process; the vocabulary-parallel collectives are
``tests/dist/test_vocab_parallel.py``'s)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from elastic.runtime.parallel.vocab import _Head


@pytest.mark.timeout(30)
def test_head_equals_autocast_linear_and_keeps_no_weight_copy(monkeypatch):
    monkeypatch.setattr(_Head, "BLOCK_BYTES", 7 * 16 * 2)  # blocks of 7 rows: several, the last one short
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(5, 16, generator=g), torch.randn(40, 16, generator=g)
    upstream = torch.randn(5, 40, generator=g)

    def run(head):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                logits = head(h, w)
        (logits.float() * upstream).sum().backward()
        return logits, h.grad, w.grad, saved

    ours, ours_h, ours_w, saved = run(lambda h, w: _Head.apply(h, w, torch.bfloat16))
    want, want_h, want_w, _ = run(F.linear)
    assert ours.dtype == want.dtype == torch.bfloat16 and torch.equal(ours, want)
    assert torch.equal(ours_w, want_w)  # each row of the weight's gradient is its own dot products
    # The hidden states' gradient sums the blocks in float32 where F.linear rounds the whole sum to bf16 once.
    assert (ours_h - want_h).abs().max() <= 2**-7 * want_h.abs().max()
    assert not any(t.dtype == torch.bfloat16 and t.numel() == weight.numel() for t in saved), "a weight copy was kept"
    # float64, no autocast: the plain matmul and its gradients.
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    _Head.apply(h, w, torch.float64).mul(upstream.double()).sum().backward()
    assert torch.allclose(h.grad, upstream.double() @ w.detach(), rtol=1e-12)
    assert torch.allclose(w.grad, upstream.double().T @ h.detach(), rtol=1e-12)
