"""``model/cast_linear``: a layer's matmul under autocast without keeping autocast's bf16 weight copy, against
``F.linear`` under ``torch.autocast`` in one process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from elastic.model.cast_linear import cast_linear


def _run(linear, x, w, b, upstream, autocast=True):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_(w.dtype == torch.float32)
    b = None if b is None else b.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
            out = linear(x, w, b)
    (out.float() * upstream).sum().backward()
    return out, x.grad, w.grad, None if b is None else b.grad, saved


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bias", [False, True])
def test_cast_linear_equals_autocast_linear_and_keeps_no_weight_copy(bias):
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 7, 24, generator=g), torch.randn(40, 24, generator=g)
    b = torch.randn(40, generator=g) if bias else None
    upstream = torch.randn(3, 7, 40, generator=g)
    ours = _run(cast_linear, x, w, b, upstream)
    want = _run(F.linear, x, w, b, upstream)
    for mine, theirs in zip(ours[:4], want[:4], strict=True):  # output, input/weight/bias gradients: bit for bit
        assert (mine is None) == (theirs is None)
        assert mine is None or (mine.dtype == theirs.dtype and torch.equal(mine, theirs))
    assert ours[0].dtype == torch.bfloat16 and ours[2].dtype == torch.float32
    assert any(t.dtype == torch.bfloat16 and t.numel() == w.numel() for t in want[4]), "F.linear keeps its copy"
    assert not any(t.dtype == torch.bfloat16 and t.numel() == w.numel() for t in ours[4]), "a weight copy was kept"


@pytest.mark.timeout(30)
def test_cast_linear_is_f_linear_where_autocast_casts_no_weight():
    g = torch.Generator().manual_seed(6)
    x, upstream = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 6, generator=g)
    w = torch.randn(6, 8, generator=g)
    for weight, autocast in ((w, False), (w.to(torch.bfloat16), True), (w.double(), False)):
        xs = x.to(weight.dtype) if weight.dtype == torch.float64 else x
        ours, want = _run(cast_linear, xs, weight, None, upstream, autocast), _run(F.linear, xs, weight, None,
                                                                                    upstream, autocast)
        for mine, theirs in zip(ours[:3], want[:3], strict=True):
            assert (mine is None) == (theirs is None)
            assert mine is None or torch.equal(mine, theirs)
