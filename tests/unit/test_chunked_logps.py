"""Per-token log-probs and entropies without whole logits (``model/loss.lm_token_logps``, ``LlamaStage(targets=)``,
GRPO's ``token_logps``): in float64, the same values and gradients as ``F.log_softmax`` of the whole logits and
a gather (the entropy as -sum p log p), chunked or not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from elastic.model import loss as loss_module
from elastic.model.llama import LlamaStage, padding_for
from elastic.model.loss import chunk_positions, lm_token_logps
from elastic.recipes.grpo.worker import token_logps
from tests.helpers import tiny_config


def _whole(logits: torch.Tensor, targets: torch.Tensor):
    every = F.log_softmax(logits, dim=-1)
    return every.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(every.exp() * every).sum(-1)


def _grads(out: torch.Tensor, coef: torch.Tensor, leaves) -> list[torch.Tensor]:
    return list(torch.autograd.grad((out * coef).sum(), leaves))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("per_chunk", [None, 1, 4, 7, 21, 64])
def test_chunked_logps_equal_whole_log_softmax(per_chunk):
    torch.manual_seed(0)
    vocab, dim = 11, 5
    hidden = torch.randn(3, 7, dim, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, dim, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (3, 7))
    coef = torch.randn(3, 7, dtype=torch.float64)
    calls = []

    def head(h):
        calls.append(len(h))
        return F.linear(h, weight)

    want, want_entropy = _whole(F.linear(hidden, weight), targets)
    want_grads = _grads(want, coef, (hidden, weight))
    chunk_bytes = None if per_chunk is None else per_chunk * 4 * vocab
    if per_chunk is not None:
        assert chunk_positions(vocab, chunk_bytes) == per_chunk
    got, entropy = lm_token_logps(hidden, head, vocab, targets, with_entropy=True, chunk_bytes=chunk_bytes)
    assert got.shape == entropy.shape == targets.shape and not entropy.requires_grad
    assert (got - want).abs().max() <= 1e-12 and (entropy - want_entropy).abs().max() <= 1e-12
    forward_calls = list(calls)
    for a, b in zip(_grads(got, coef, (hidden, weight)), want_grads, strict=True):
        assert (a - b).abs().max() <= 1e-12
    if per_chunk is not None and per_chunk < 21:  # chunked: each chunk's head once more in backward
        assert forward_calls == [per_chunk] * (21 // per_chunk) + ([21 % per_chunk] if 21 % per_chunk else [])
        assert sorted(calls) == sorted(forward_calls * 2)
    alone, none = lm_token_logps(hidden, head, vocab, targets, chunk_bytes=chunk_bytes)
    assert none is None and torch.equal(alone, got)
    with torch.no_grad():  # old and reference log-probs: chunked without checkpoints
        assert torch.equal(lm_token_logps(hidden, head, vocab, targets, chunk_bytes=chunk_bytes)[0], got.detach())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunked", [False, True])
def test_grpo_token_logps_equal_log_softmax_of_the_stage_logits(monkeypatch, chunked):
    """The worker's ``token_logps`` (the stage's ``targets=`` forward), left-padded rows too, against the
    log-softmax of the stage's whole logits: values, entropies and every parameter's gradient."""
    cfg = tiny_config()
    torch.manual_seed(0)
    stage = LlamaStage(cfg.model).double()
    prompt_len, batch = 5, 3
    ids = torch.randint(0, cfg.model.vocab_size, (batch, prompt_len + 4))
    mask = torch.ones(batch, prompt_len, dtype=torch.bool)
    mask[1, :2] = False  # a left-padded prompt
    coef = torch.randn(batch, 4, dtype=torch.float64)
    params = list(stage.parameters())
    logits = stage(ids, 0, None, padding_for(mask, ids.shape[1]))[:, prompt_len - 1:-1]
    want, want_entropy = _whole(logits, ids[:, prompt_len:])
    want_grads = _grads(want, coef, params)
    if chunked:  # 12 positions in chunks of 5: 5, 5, 2
        monkeypatch.setattr(loss_module, "CHUNK_LOGIT_BYTES", 5 * 4 * cfg.model.vocab_size)
    got, entropy = token_logps(stage, ids, prompt_len, mask, with_entropy=True)
    assert (got - want).abs().max() <= 1e-12 and (entropy - want_entropy).abs().max() <= 1e-12
    for a, b in zip(_grads(got, coef, params), want_grads, strict=True):
        assert (a - b).abs().max() <= 1e-12
    alone = token_logps(stage, ids, prompt_len, mask)
    assert torch.equal(alone, got)
