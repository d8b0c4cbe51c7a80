"""Sampling with a KV cache: temperature, top-p, a cap on new tokens, and stop tokens.

Prompts in one batch must have the same length (the built-in tasks are built that way), so no
attention mask is needed: every prompt token is real, and tokens after a stop are discarded.
Randomness comes from a generator per sequence, seeded by the caller (for GRPO: by the global
prompt index), so a sample does not depend on which worker draws it or on its batch-mates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from elastic.model.llama import KVCache, LlamaStage, Padding, padding_for


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


@torch.no_grad()
def sample(model: LlamaStage, prompts: torch.Tensor, cfg: SamplingConfig,
           generators: list[torch.Generator] | None = None,
           prompt_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample continuations of ``prompts`` [B, P]; ``prompt_mask`` [B, P] marks the real tokens of
    left-padded prompts (None: every prompt is P real tokens).

    Returns (tokens [B, N], lengths [B]): new tokens, padded after each sequence's end with its
    stop token; ``lengths`` counts tokens up to and including the first stop token.
    """
    batch = prompts.shape[0]
    cache = KVCache()
    pad = None if prompt_mask is None else padding_for(prompt_mask)
    logits = model(prompts, 0, cache, pad)[:, -1]
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
