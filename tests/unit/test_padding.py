"""Left-padded prompts (GRPO on users' prompts of different lengths): a padded row computes what the
same row computes alone and unpadded, in the full pass and in KV-cache sampling, and a completion
does not depend on its batch-mates."""

from __future__ import annotations

import torch

from elastic.model.generate import SamplingConfig, sample
from elastic.model.llama import padding_for
from tests.helpers import peaked_stage


def left_pad(rows: list[list[int]], width: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    return ids, mask


PROMPTS = [[5, 17, 200, 3, 9, 44], [61, 2], [8, 8, 90, 120]]


@torch.no_grad()
def test_padded_rows_equal_unpadded_rows():
    m = peaked_stage()
    ids, mask = left_pad(PROMPTS, 9)
    logits = m(ids, 0, None, padding_for(mask))
    for row, prompt in enumerate(PROMPTS):
        alone = m(torch.tensor([prompt]))[0]
        torch.testing.assert_close(logits[row, -len(prompt):], alone, atol=1e-12, rtol=0)
    assert torch.isfinite(logits).all()  # padded queries attend to themselves: no empty softmax row


@torch.no_grad()
def test_sampling_is_independent_of_padding_and_batch_mates():
    m = peaked_stage()
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, stop_ids=(258,))

    def gens():
        return [torch.Generator().manual_seed(100 + i) for i in range(len(PROMPTS))]

    ids, mask = left_pad(PROMPTS, 8)
    together, lengths = sample(m, ids, cfg, gens(), prompt_mask=mask)
    for row, prompt in enumerate(PROMPTS):
        alone, n = sample(m, torch.tensor([prompt]), cfg, [gens()[row]])
        assert int(lengths[row]) == int(n[0])
        assert torch.equal(together[row, : int(n[0])], alone[0, : int(n[0])])  # beyond the stop: filler
    wider, _ = sample(m, *left_pad(PROMPTS, 12)[:1], cfg, gens(), prompt_mask=left_pad(PROMPTS, 12)[1])
    assert torch.equal(wider, together)
