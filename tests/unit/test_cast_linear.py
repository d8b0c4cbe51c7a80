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


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tied", [True, False])
def test_a_frozen_head_is_cast_once_for_every_chunk_with_the_same_results(monkeypatch, tied):
    """Under autocast a chunked loss and chunked log-probs use one bf16 copy of a frozen float32 head
    (``cast_frozen``) instead of casting it in every chunk: the same values and input gradients as unchunked,
    where the head goes through ``cast_linear``; a trained head is still cast per call."""
    from elastic.model import cast_linear as module
    from elastic.model import loss
    from elastic.model.llama import LlamaStage
    from tests.helpers import tiny_config

    cfg = tiny_config(tie_embeddings=tied).model
    torch.manual_seed(0)
    stage = LlamaStage(cfg)
    head = stage.model.embed_tokens.weight if tied else stage.lm_head.weight
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    made = []
    real = module.cast_frozen
    monkeypatch.setattr("elastic.model.llama.cast_frozen", lambda w: made.append(real(w)) or made[-1])

    def run(chunk_bytes, trained):
        head.requires_grad_(trained)
        monkeypatch.setattr(loss, "CHUNK_LOGIT_BYTES", chunk_bytes)
        stage.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            logps, entropy = stage(ids, targets=ids[:, 4:], with_entropy=True)
            total = stage(ids, labels=ids)
        (logps.sum() + total).backward()
        return logps, entropy, total, stage.model.layers["0"].mlp.down_proj.weight.grad.clone()

    whole = run(1 << 30, trained=False)
    assert made == []  # one chunk: cast_linear per call, nothing cast ahead
    chunked = run(4 * cfg.vocab_size * 3, trained=False)  # three positions per chunk
    assert len(made) == 2 and all(c is not None and c.dtype == torch.bfloat16 for c in made)
    for ours, want in zip(chunked, whole, strict=True):
        assert torch.allclose(ours, want, rtol=1e-5, atol=1e-6)  # chunk sums in another order, nothing else
    made.clear()
    run(4 * cfg.vocab_size * 3, trained=True)
    assert made == [None, None]  # a trained head's gradient must reach the float32 parameter
