"""Sampling with a KV cache: temperature, top-p, a cap on new tokens, and stop tokens.

Prompts come as one batch [B, P]: all of length P, or left-padded to P with a mask of their real
tokens (``prompt_mask``; the model then takes a ``Padding``). Tokens after a stop are discarded.
Randomness comes from a generator per sequence, seeded by the caller (for GRPO: by the global
prompt index and the sample index), so a sample does not depend on which worker draws it or on
its batch-mates.

The prefill is shared (``share_prefill``, the default). GRPO's batch holds each prompt G times in
a row, and prompts often open with the same header (a system prompt, few-shot examples). So each
distinct prompt is prefilled once, after a prefix common to all of them is prefilled once at batch
1; the KV cache is then copied row by row to the whole batch (``KVCache.select_rows``) and the B
rows decode exactly as before. A row is its tokens and its mask, so left-padded prompts work; but
prompts of different lengths, left-padded, are not aligned, so a header they share is not a common
prefix (only their shared leading pads are): the header is shared only when no row is padded, or
when all have the same padding. A short prefix is not worth its own pass (``MIN_SHARED_TOKENS``).

``share_prefill=False`` is the old path, one prefill of all B rows, kept for the tests and
``bench/rollout.py``. The two sample the same tokens and leave every generator in the same state
(``tests/unit/test_prefill.py``, for equal-length and left-padded prompts, with and without a
header, G = 1..8, top-p, float32 and float64). Their logits agree to a few ulps, not bit for bit:
on this CPU build a row's rounding depends on its batch-mates (MKL rounds the last M % 4 rows of a
matmul differently; float64 attention differs with the thread that computes a row), which already
gives the G copies of a prompt ulp-different logits in the old path. The shared path gives them one
cache. A token could in principle flip where a draw lands within an ulp of a bucket edge, as it
could between any two batchings of the old path (a worker's batch and the reference's per-prompt one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from elastic.model.llama import KVCache, LlamaStage, Padding, padding_for

# A common prefix gets its own pass when it saves at least this many prompt tokens of prefill, (distinct
# prompts - 1) x its length: a pass has a fixed cost (~2 ms on the 'mini' preset, one thread), and there
# the break-even was ~100 tokens (e.g. 4 prompts after a 33-token header; 2 prompts need ~100 tokens).
MIN_SHARED_TOKENS = 96


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1]")


def _filter_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p (always the top one)."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p
    sorted_p = sorted_p * keep
    out = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return out / out.sum(-1, keepdim=True)


def _part(pad: Padding | None, rows: list[int], start: int, stop: int) -> Padding | None:
    """``pad`` for a pass over columns start:stop of some rows (its keys: every column up to stop)."""
    return None if pad is None else Padding(pad.keys[rows, :stop], pad.positions[rows, start:stop])


def _distinct(prompts: torch.Tensor, pad: Padding | None) -> tuple[list[int], torch.Tensor]:
    """The first row of each distinct prompt, in order of appearance, and each row's distinct prompt [B].

    A row is its tokens and, when padded, its mask: a pad id can also be a real token."""
    key = prompts if pad is None else torch.cat([prompts, pad.keys.long()], dim=1)
    seen: dict[tuple, int] = {}
    inverse = [seen.setdefault(tuple(row), len(seen)) for row in key.tolist()]
    first = [inverse.index(d) for d in range(len(seen))]
    return first, torch.tensor(inverse, dtype=torch.long)


def _common_prefix(prompts: torch.Tensor, mask: torch.Tensor | None) -> int:
    """How many leading columns all rows share (tokens and, when padded, which of them are real)."""
    same = (prompts == prompts[:1]).all(0)
    if mask is not None:
        same &= (mask == mask[:1]).all(0)
    return int(same.long().cumprod(0).sum())


@torch.no_grad()
def prefill(model: LlamaStage, prompts: torch.Tensor, pad: Padding | None = None,
            share: bool = True) -> tuple[KVCache, torch.Tensor]:
    """Run ``prompts`` [B, P] through the model: the KV cache of every row, and each row's last logits [B, V].

    ``share``: each distinct row once, after their common prefix once (see the module docstring);
    otherwise one pass over all B rows.
    """
    cache = KVCache()
    first, inverse = _distinct(prompts, pad) if share else (range(len(prompts)), None)
    n, width = len(first), prompts.shape[1]
    # Distinct rows differ in some column, so when there are two or more a common prefix leaves each a remainder.
    shared = _common_prefix(prompts[first], None if pad is None else pad.keys[first]) if share and n > 1 else 0
    if (n - 1) * shared < MIN_SHARED_TOKENS:
        shared = 0
    if n == len(prompts) and not shared:  # nothing to share: one pass over the batch
        return cache, model(prompts, 0, cache, pad)[:, -1]
    if shared:
        model(prompts[first[:1], :shared], 0, cache, _part(pad, first[:1], 0, shared))  # the prefix, at batch 1
        cache.select_rows(torch.zeros(n, dtype=torch.long))  # its cache, once per distinct prompt
        logits = model(prompts[first, shared:], shared, cache, _part(pad, first, shared, width))[:, -1]
    else:
        logits = model(prompts[first], 0, cache, _part(pad, first, 0, width))[:, -1]
    cache.select_rows(inverse)  # row i of the batch takes the cache and the logits of its distinct prompt
    return cache, logits[inverse]


@torch.no_grad()
def sample(model: LlamaStage, prompts: torch.Tensor, cfg: SamplingConfig,
           generators: list[torch.Generator] | None = None,
           prompt_mask: torch.Tensor | None = None, share_prefill: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample continuations of ``prompts`` [B, P]; ``prompt_mask`` [B, P] marks the real tokens of
    left-padded prompts (None: every prompt is P real tokens). ``share_prefill``: prefill each distinct
    prompt once (after their common prefix once) instead of all B rows; the samples are the same.

    Returns (tokens [B, N], lengths [B]): new tokens, padded after each sequence's end with its
    stop token; ``lengths`` counts tokens up to and including the first stop token.
    """
    batch = prompts.shape[0]
    pad = None if prompt_mask is None else padding_for(prompt_mask)
    cache, logits = prefill(model, prompts, pad, share_prefill)
    out = torch.zeros(batch, cfg.max_new_tokens, dtype=torch.long)
    lengths = torch.full((batch,), cfg.max_new_tokens, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    stops = torch.tensor(cfg.stop_ids or (-1,), dtype=torch.long)
    pos = prompts.shape[1]
    for t in range(cfg.max_new_tokens):
        if cfg.temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = _filter_top_p(torch.softmax(logits.double() / cfg.temperature, -1), cfg.top_p)
            if generators is None:
                nxt = torch.multinomial(probs, 1).squeeze(-1)
            else:
                nxt = torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(generators)])
        nxt = torch.where(done, out[:, max(t - 1, 0)], nxt)
        out[:, t] = nxt
        hit = torch.isin(nxt, stops) & ~done
        lengths = torch.where(hit, torch.full_like(lengths, t + 1), lengths)
        done |= hit
        if bool(done.all()) or t == cfg.max_new_tokens - 1:
            break
        if prompt_mask is not None:  # the new token is real, at its row's next position
            keys = torch.cat([pad.keys, pad.keys.new_ones(batch, 1)], dim=1)
            pad = Padding(keys, pad.positions[:, -1:] + 1)
        logits = model(nxt[:, None], pos, cache, pad)[:, -1]
        pos += 1
    return out, lengths
