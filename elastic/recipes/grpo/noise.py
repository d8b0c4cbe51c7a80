"""A noisy-reward channel and the unbiased corrected reward (rates per group, and their estimation: ``rates.py``).

Model (arXiv:2510.18924): the true reward r* is 0 or 1, and the observed reward r~ flips it with
class-conditional rates

    rho_plus  = P(r~ = 1 | r* = 0)   (false positive: a wrong answer is accepted)
    rho_minus = P(r~ = 0 | r* = 1)   (false negative: a right answer is rejected)

so E[r~ | r*] = rho_plus + (1 - rho_plus - rho_minus) * r*. Inverting that affine map gives the
corrected reward r^ = (r~ - rho_plus) / (1 - rho_plus - rho_minus) with E[r^ | r*] = r* exactly.
It needs rho_plus + rho_minus < 1: at 1 the observation carries no information about r*.

The simulated channel draws one uniform per sample from a hash of (seed, split, step, global prompt
index, sample index). The draw therefore does not depend on which worker computes it, on its
batch-mates, or on the layout, which keeps layout-invariant math (DESIGN.md, invariant 1) intact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from elastic.core.seeds import stable_seed

_TWO_63 = float(2**63)


@dataclass(frozen=True)
class FlipRates:
    """Class-conditional flip rates of a 0/1 reward; validated on construction."""

    rho_plus: float = 0.0
    rho_minus: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rho_plus", "rho_minus"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite number in [0, 1)")
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value} must lie in [0, 1): it is a probability of flipping the reward, "
                                 "and a rate of 1 would flip every reward of that class")
        if self.rho_plus + self.rho_minus >= 1.0:
            raise ValueError(
                f"rho_plus + rho_minus = {self.rho_plus} + {self.rho_minus} = {self.rho_plus + self.rho_minus:g} "
                "must be < 1: at 1 the observed reward is independent of the true one (nothing to correct), and "
                "above 1 the channel is inverted; lower the rates (or swap the reward's labels)"
            )

    @property
    def scale(self) -> float:
        """1 - rho_plus - rho_minus: the slope of E[r~ | r*] in r*, always in (0, 1]."""
        return 1.0 - self.rho_plus - self.rho_minus


def corrected_reward(observed: torch.Tensor, rates: FlipRates) -> torch.Tensor:
    """The unbiased reward r^ = (r~ - rho_plus) / (1 - rho_plus - rho_minus) (E[r^ | r*] = r*).

    Its values lie outside [0, 1] whenever a rate is non-zero: that is the price of unbiasedness.
    """
    return (observed - rates.rho_plus) / rates.scale


def _check_binary(values: torch.Tensor, what: str) -> None:
    bad = ~((values == 0) | (values == 1) | values.isnan())  # NaN: unscorable (no reward function applied)
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise ValueError(f"{what}[{index}]={float(values.flatten()[index])!r} is not 0 or 1; "
                         "the flip-noise model applies to binary (verifiable) rewards only")


class RewardNoise:
    """The simulated flip channel: deterministic per (seed, split, step, prompt index, sample index).

    ``split`` keeps training and calibration draws apart; ``step`` (or epoch, or training position)
    gives a prompt revisited later fresh noise. Neither depends on the worker that computes it.
    """

    def __init__(self, rates: FlipRates, seed: int) -> None:
        self.rates, self.seed = rates, seed

    def uniform(self, prompt_index: int, sample_index: int, step: int = 0, split: str = "train") -> float:
        """A uniform draw in [0, 1) from a 63-bit hash: cheap and identical on every process."""
        return stable_seed(self.seed, "reward-noise", split, step, prompt_index, sample_index) / _TWO_63

    def observe(self, clean: torch.Tensor, prompt_indices: Sequence[int], sample_indices: Sequence[int],
                step: int = 0, split: str = "train", rates=None) -> torch.Tensor:
        """Observed rewards r~ for true 0/1 rewards ``clean`` [N] at the given (prompt, sample) keys.

        r* = 0 becomes 1 when u < rho_plus; r* = 1 becomes 0 when u < rho_minus (one u per sample); an
        unscorable NaN stays NaN.
        ``rates``: per-sample rates (``rates.RowRates`` [N], e.g. of each prompt's rate group); None:
        the channel's own.
        """
        clean = clean.reshape(-1)
        if not len(prompt_indices) == len(sample_indices) == clean.numel():
            raise ValueError(f"got {clean.numel()} rewards, {len(prompt_indices)} prompt indices and "
                             f"{len(sample_indices)} sample indices; pass one of each per reward")
        _check_binary(clean, "clean reward")
        keys = zip(prompt_indices, sample_indices, strict=True)
        u = torch.tensor([self.uniform(int(p), int(s), step, split) for p, s in keys], dtype=torch.float64)
        rates = rates or self.rates
        flip = torch.where(clean == 1, u < rates.rho_minus, u < rates.rho_plus)
        return torch.where(flip, 1 - clean, clean)  # NaN (unscorable) stays NaN: 1 - NaN is NaN

    def observe_groups(self, clean: torch.Tensor, prompt_indices: Sequence[int], num_generations: int,
                       step: int = 0, split: str = "train", rates=None) -> torch.Tensor:
        """``observe`` for the GRPO layout: rewards [P * G], prompt p's G samples consecutive; ``rates``
        per prompt (``RowRates`` [P]) or None."""
        prompts = [int(p) for p in prompt_indices for _ in range(num_generations)]
        samples = [s for _ in prompt_indices for s in range(num_generations)]
        return self.observe(clean, prompts, samples, step, split,
                            None if rates is None else rates.repeat(num_generations))
