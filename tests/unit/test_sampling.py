"""``model/generate.sample`` against an independent definition of sampling (``tests/reference.py``).

The reference samples each completion alone and unpadded, recomputing the whole forward for every
token (no KV cache), then softmax(logits / T) in float64, a hand-written top-p and a categorical draw
by the exponential race from the completion's own generator. ``sample`` decodes a left-padded batch
with its KV cache and ``torch.multinomial``. Both read one generator per completion, so they must
pick the same tokens and stop at the same place; any error in temperature, top-p (or its order with
temperature), stop handling, left padding or the cached decode changes a token. The draw and the
top-p filter are themselves checked here: the draw against the frequencies it should give, the filter
against transformers' own ``TemperatureLogitsWarper`` and ``TopPLogitsWarper``.

At temperature 0.7 and top-p 0.9 (the filter keeps fewer tokens than the vocabulary, so it runs).
"""

from __future__ import annotations

import pytest
import torch

from elastic.model.generate import SamplingConfig, sample
from elastic.model.llama import LlamaStage
from tests.helpers import peaked_stage
from tests.reference import categorical, reference_sample, top_p_filter

PROMPTS = [[5, 17, 33, 2, 90], [41, 7], [12, 250, 3, 77, 8, 19, 64], [99, 98, 97]]
NEW = 8



def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def gens(seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(len(PROMPTS))]


def test_the_reference_draw_has_the_categorical_frequencies():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0], dtype=torch.float64)
    g, n = torch.Generator().manual_seed(0), 6000
    counts = torch.bincount(torch.tensor([categorical(probs * 3, g) for _ in range(n)]), minlength=5)
    sigma = (n * probs * (1 - probs)).sqrt()
    assert counts[4] == 0  # a filtered token is never drawn
    assert ((counts - n * probs).abs() <= 4 * sigma + 1e-9).all(), counts.tolist()


def test_top_p_by_hand_and_as_transformers_filters():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3], dtype=torch.float64)
    expected = torch.tensor([0.0, 0.5, 0.15, 0.3], dtype=torch.float64) / 0.95  # 0.5 + 0.3 < 0.9: add 0.15
    torch.testing.assert_close(top_p_filter(probs, 0.9), expected, rtol=0, atol=1e-15)
    assert torch.equal(top_p_filter(probs, 0.5), torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))

    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.randn(32, 300, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.5
    theirs = TopPLogitsWarper(0.9)(None, TemperatureLogitsWarper(0.7)(None, logits.clone()))  # generate's order
    for row, their in zip(logits, theirs, strict=True):
        ours = top_p_filter(torch.softmax(row / 0.7, -1), 0.9)
        assert torch.equal(ours > 0, their.isfinite())
        assert 1 < int((ours > 0).sum()) < len(row)  # the filter ran and kept more than one token
        torch.testing.assert_close(ours, torch.softmax(their, -1), rtol=0, atol=1e-12)


def reference(m: LlamaStage, cfg: SamplingConfig, seed: int) -> list[list[int]]:
    return [reference_sample(m, p, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.stop_ids, g)
            for p, g in zip(PROMPTS, gens(seed), strict=True)]


def cut(rows: list[list[int]], stop: int) -> list[list[int]]:
    """Each row up to and including its first ``stop``: what a reference run with that stop token draws
    (a completion's draws do not depend on the stop tokens until it stops)."""
    return [r[: r.index(stop) + 1] if stop in r else r for r in rows]


@pytest.mark.parametrize("temperature,top_p,share_prefill", [(0.7, 0.9, True), (0.7, 0.9, False), (0, 1.0, True)],
                         ids=["T0.7-p0.9-shared-prefill", "T0.7-p0.9-plain-prefill", "greedy"])
def test_sample_draws_the_reference_tokens(temperature, top_p, share_prefill):
    m = peaked_stage()
    unstopped = reference(m, SamplingConfig(NEW, temperature, top_p), 0)
    # A stop token that ends one completion early (the third or fourth token a prompt draws) and not another.
    stop = next(t for row in unstopped for t in row[2:4] if any(t not in other for other in unstopped))
    expected = cut(unstopped, stop)
    assert min(map(len, expected)) <= 4 and max(map(len, expected)) == NEW
    cfg = SamplingConfig(NEW, temperature, top_p, stop_ids=(stop, 300))
    ids, mask = left_pad(PROMPTS)
    tokens, lengths = sample(m, ids, cfg, gens(0), prompt_mask=mask, share_prefill=share_prefill)
    assert [tokens[r, : int(n)].tolist() for r, n in enumerate(lengths)] == expected
    if temperature:  # T and top-p matter here: sampling at T = 1 without top-p draws other tokens
        plain, _ = sample(m, ids, SamplingConfig(NEW, 1.0, 1.0, cfg.stop_ids), gens(0), prompt_mask=mask)
        assert not torch.equal(plain, tokens)
