"""Shared prefill (``model/generate.py``): each distinct prompt prefilled once and a common prefix once,
against one prefill of the whole repeated batch (``share_prefill=False``), in the same process.

What holds, exactly: the completions (tokens, lengths) and every generator's state after sampling are
bit-identical. The prefill's logits and KV cache agree to a few ulps but are not bit-identical: on this
CPU build a row's rounding depends on its batch-mates (MKL rounds the last M % 4 rows of a matmul
differently, and float64 attention differs by the thread that computes a row), so even the old path
gives the G identical copies of one prompt ulp-different logits, while the shared path gives them the
same cache. The logit checks below bound that difference; the token checks are exact.

Also here: GRPO's plain rollout model is in eval mode, so LoRA dropout cannot reach sampling.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from elastic.core.config import MODEL_PRESETS, LoraConfig
from elastic.model import generate
from elastic.model.generate import SamplingConfig, prefill, sample
from elastic.model.llama import LlamaStage, padding_for
from elastic.model.lora import apply_lora, dropout_rows
from elastic.recipes.grpo.worker import _Functional, _plain_model, rollout_batch, token_logps

CFG = dataclasses.replace(MODEL_PRESETS["tiny"], qk_norm=True, qkv_bias=True)
STOP = 258
# Bounds on the prefill logits' difference: a few ulps of logits of order 10 (the weights' std is 0.3).
ATOL = {torch.float32: 2e-5, torch.float64: 4e-14}


@pytest.fixture
def every_prefix(monkeypatch):
    """Give every common prefix its own pass, however few tokens it saves (the tests' prompts are short)."""
    monkeypatch.setattr(generate, "MIN_SHARED_TOKENS", 1)


def model(cfg=CFG, dtype=torch.float64) -> LlamaStage:
    """Weights of std 0.3: peaked next-token distributions, so that a wrong logit changes the samples."""
    torch.manual_seed(0)
    m = LlamaStage(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def prompts(kind: str, count: int = 3, header: int = 6) -> list[list[int]]:
    """Token rows: 'distinct' (no common first token), 'header' (a common header, equal lengths),
    'padded' (different lengths: left-padded they are not aligned), 'padded_header' (a header too)."""
    g = torch.Generator().manual_seed(11)
    head = torch.randint(3, 250, (header,), generator=g).tolist() if "header" in kind else []
    lengths = [5, 2, 4, 7][:count] if "padded" in kind else [5] * count
    rows = [head + torch.randint(3, 250, (n,), generator=g).tolist() for n in lengths]
    if kind == "distinct":
        rows = [[10 + i] + r[1:] for i, r in enumerate(rows)]
    return rows


def grpo_batch(rows: list[list[int]], groups: int, width: int | None = None):
    """The Rollout task's own batch: each prompt G times, left-padded to ``width``, one generator a row."""
    width = width or max(map(len, rows))
    items = [(i, [0] * (width - len(r)) + r, [False] * (width - len(r)) + [True] * len(r)) for i, r in enumerate(rows)]
    return rollout_batch(items, groups, seed=5, grpo_step=3)


def both_ways(m, rows, groups, width, cfg):
    """Sample the Rollout batch shared and not; also whether every generator ends in the same state."""
    ids, mask, new_gens = grpo_batch(rows, groups, width)
    old_gens = grpo_batch(rows, groups, width)[2]
    new = sample(m, ids, cfg, new_gens, prompt_mask=mask)
    old = sample(m, ids, cfg, old_gens, prompt_mask=mask, share_prefill=False)
    states = all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(new_gens, old_gens, strict=True))
    return new, old, states


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["distinct", "header", "padded", "padded_header"])
def test_shared_prefill_samples_the_same_completions(kind, dtype, every_prefix):
    m = model(dtype=dtype)
    rows = prompts(kind)
    width = max(map(len, rows)) + (2 if kind == "padded_header" else 0)  # padded_header: two shared pad columns
    for groups in range(1, 9):
        ids, mask, _ = grpo_batch(rows, groups, width)
        assert (mask is not None) == ("padded" in kind)
        top_p = 0.9 if groups % 2 else 1.0  # both, across the G values (a sample costs ~15 ms here)
        cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=top_p, stop_ids=(STOP,))
        (tokens, lengths), (old_tokens, old_lengths), states = both_ways(m, rows, groups, width, cfg)
        assert torch.equal(tokens, old_tokens) and torch.equal(lengths, old_lengths), (kind, groups, top_p)
        assert states, "every generator must have drawn exactly as before"
        pad = None if mask is None else padding_for(mask)
        cache, logits = prefill(m, ids, pad)
        old_cache, old_logits = prefill(m, ids, pad, share=False)
        torch.testing.assert_close(logits, old_logits, rtol=0, atol=ATOL[dtype])
        for layer in old_cache.keys:
            torch.testing.assert_close(cache.keys[layer], old_cache.keys[layer], rtol=0, atol=ATOL[dtype])
            torch.testing.assert_close(cache.values[layer], old_cache.values[layer], rtol=0, atol=ATOL[dtype])
        # The G rows of one prompt share one cache exactly (the old path's copies may differ by an ulp).
        for layer in cache.keys:
            assert torch.equal(cache.keys[layer], cache.keys[layer][::groups].repeat_interleave(groups, 0))


class Recorder:
    """Calls the model and records each pass's input shape."""

    def __init__(self, m):
        self.m, self.shapes = m, []

    def __call__(self, x, start=0, cache=None, pad=None):
        self.shapes.append(tuple(x.shape))
        return self.m(x, start, cache, pad)


@pytest.mark.timeout(30)
def test_each_prompt_is_prefilled_once_and_the_header_once(monkeypatch):
    m, header = model(), 6
    cases = (("distinct", 1, [(3, 5)]), ("header", 1, [(1, header), (3, 5)]), ("padded", 1, [(3, 5)]),
             ("header", generate.MIN_SHARED_TOKENS, [(3, header + 5)]))  # by default, 2 x 6 tokens are too few
    for kind, least, first_passes in cases:
        monkeypatch.setattr(generate, "MIN_SHARED_TOKENS", least)
        ids, mask, _ = grpo_batch(prompts(kind, header=header), 8)
        pad = None if mask is None else padding_for(mask)
        shared, plain = Recorder(m), Recorder(m)
        prefill(shared, ids, pad)
        prefill(plain, ids, pad, share=False)
        assert shared.shapes == first_passes and plain.shapes == [(24, ids.shape[1])], kind


@pytest.mark.timeout(30)
def test_greedy_and_the_global_generator_draw_the_same(every_prefix):
    m = model()
    ids, _, _ = grpo_batch(prompts("header"), 4)
    greedy = SamplingConfig(max_new_tokens=6, temperature=0)
    assert torch.equal(sample(m, ids, greedy)[0], sample(m, ids, greedy, share_prefill=False)[0])
    cfg = SamplingConfig(max_new_tokens=6, top_p=0.9)
    torch.manual_seed(3)
    new = sample(m, ids, cfg)
    torch.manual_seed(3)
    assert torch.equal(new[0], sample(m, ids, cfg, share_prefill=False)[0])


@pytest.mark.timeout(30)
def test_mini_model_with_a_64_token_header():
    """The bench's long-prompt case: the 'mini' preset in float32 (GRPO's default), four prompts after a
    64-token few-shot header, G = 8."""
    m = model(MODEL_PRESETS["mini"], torch.float32)
    rows = prompts("header", count=4, header=64)
    assert (4 - 1) * 64 >= generate.MIN_SHARED_TOKENS  # the header gets its pass by default
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=0.95, stop_ids=(STOP,))
    (tokens, lengths), (old_tokens, old_lengths), states = both_ways(m, rows, 8, None, cfg)
    assert torch.equal(tokens, old_tokens) and torch.equal(lengths, old_lengths) and states
    ids = grpo_batch(rows, 8)[0]
    torch.testing.assert_close(prefill(m, ids)[1], prefill(m, ids, share=False)[1], rtol=0, atol=ATOL[torch.float32])


@pytest.mark.timeout(30)
def test_the_plain_rollout_model_is_in_eval_mode():
    """LoRA dropout (p = 0.5) must not reach rollouts or old/reference log-probs, even inside a block that
    names dropout rows; in train mode it would (the plain model used to be left in train mode)."""
    lora = LoraConfig(r=4, alpha=8.0, dropout=0.5)
    engine = SimpleNamespace(cfg=SimpleNamespace(model=CFG, lora=lora), dtype=torch.float64)
    plain = _plain_model(engine, {})
    assert not any(module.training for module in plain.modules())
    real = apply_lora(model(), lora)
    with torch.no_grad():
        for name, p in real.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # B = 0 would hide any dropout
    policy = _Functional(plain, dict(real.named_parameters()))
    ids, _, _ = grpo_batch(prompts("header"), 2)
    full = torch.cat([ids, torch.randint(3, 250, (ids.shape[0], 4))], dim=1)
    cfg = SamplingConfig(max_new_tokens=4, temperature=1.0, stop_ids=(STOP,))

    def rollout():
        gens = grpo_batch(prompts("header"), 2)[2]
        return token_logps(policy, full, ids.shape[1]), sample(policy, ids, cfg, gens)[0]

    with torch.no_grad():
        quiet = rollout()
        with dropout_rows(seed=0, step=0, samples=range(ids.shape[0])):
            named = rollout()
    assert torch.equal(quiet[0], named[0]) and torch.equal(quiet[1], named[1])
