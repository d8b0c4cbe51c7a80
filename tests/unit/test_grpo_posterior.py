"""The posterior correction (``advantage.posterior_rewards``): exact against brute-force enumeration, and
split-invariant across data-parallel ranks once the batch's prior is fixed."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from elastic.recipes.grpo.advantage import (
    group_advantages,
    noise_corrected_advantages,
    posterior_prior,
    posterior_rewards,
)
from elastic.recipes.grpo.config import GRPOConfig
from elastic.recipes.grpo.noise import FlipRates
from elastic.recipes.grpo.rates import RowRates

F64 = torch.float64


def brute_force(observed: list[int], rho_plus: float, rho_minus: float, a: float, b: float) -> list[float]:
    """E[r*_i | r~] by summing over all 2^G true reward vectors: P(r*) = B(a + s, b + G - s) / B(a, b) under the
    Beta prior (s = sum r*), times the channel's probability of each observed reward."""
    G = len(observed)
    num, den = [0.0] * G, 0.0
    for true in itertools.product((0, 1), repeat=G):
        s = sum(true)
        weight = math.exp(math.lgamma(a + s) + math.lgamma(b + G - s) - math.lgamma(a + b + G))
        for t, o in zip(true, observed, strict=True):
            p_one = (1 - rho_minus) if t == 1 else rho_plus  # P(observed 1 | true)
            weight *= p_one if o == 1 else 1 - p_one
        den += weight
        for i, t in enumerate(true):
            num[i] += weight * t
    return [x / den for x in num]


@pytest.mark.parametrize("G", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("rates", [(0.1, 0.2), (0.0, 0.3), (0.4, 0.0), (0.25, 0.25)])
def test_posterior_rewards_equal_brute_force_enumeration(G, rates):
    prior = (1.3, 2.7)
    patterns = [list(bits) for bits in itertools.product((0, 1), repeat=G)]
    grouped = torch.tensor(patterns, dtype=F64)
    rows = RowRates.of(FlipRates(*rates), len(patterns))
    got = posterior_rewards(grouped, rows, prior)
    want = torch.tensor([brute_force(p, *rates, *prior) for p in patterns], dtype=F64)
    assert torch.allclose(got, want, atol=1e-12), (got - want).abs().max()


def test_posterior_is_a_per_group_weight_on_the_centred_noisy_reward():
    """Exchangeable noise: E[r* | r~] takes two values per group, so the advantage is (c1 - c0)(r~ - mean r~);
    all-equal groups get zero, and zero rates give the plain centred reward."""
    rewards = torch.tensor([1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0], dtype=F64)
    rates = FlipRates(0.3, 0.1)
    adv = noise_corrected_advantages(rewards, 4, rates, "posterior", "none").view(4, 4)
    centred = group_advantages(rewards, 4, "none").view(4, 4)
    assert torch.equal(adv[2:], torch.zeros(2, 4, dtype=F64))  # all-equal groups: nothing to compare
    weights = adv[:2, 0] / centred[:2, 0]
    assert torch.allclose(adv[:2], weights[:, None] * centred[:2], atol=1e-12)
    # One observed success where false positives are common is probably noise: shrunk below a 2-of-4 group.
    assert 0 < weights[0] < weights[1]
    plain = noise_corrected_advantages(rewards, 4, FlipRates(), "posterior", "none")
    assert torch.allclose(plain, group_advantages(rewards, 4, "none"), atol=1e-12)


def test_posterior_is_split_invariant_given_the_batch_prior():
    """The engine fits the prior on the gathered batch; given it, each group depends on its own rewards only, so
    any split of the groups over ranks, and any order of the groups, gives the same advantages."""
    gen = torch.Generator().manual_seed(3)
    P, G = 12, 6
    rewards = (torch.rand(P * G, generator=gen, dtype=F64) < 0.4).to(F64)
    rows = RowRates(torch.rand(P, generator=gen, dtype=F64) * 0.3, torch.rand(P, generator=gen, dtype=F64) * 0.3)
    full = noise_corrected_advantages(rewards, G, rows, "posterior", "none")
    prior = posterior_prior(rewards.view(P, G), rows)
    for cuts in ([0, 5, 12], [0, 1, 2, 7, 12], [0, 12]):
        parts = [noise_corrected_advantages(rewards[lo * G:hi * G], G, RowRates(rows.rho_plus[lo:hi],
                                            rows.rho_minus[lo:hi]), "posterior", "none", prior=prior)
                 for lo, hi in itertools.pairwise(cuts)]
        assert torch.equal(torch.cat(parts), full)
    order = torch.randperm(P, generator=gen)
    shuffled = noise_corrected_advantages(rewards.view(P, G)[order].reshape(-1), G,
                                          RowRates(rows.rho_plus[order], rows.rho_minus[order]), "posterior", "none")
    assert torch.allclose(shuffled.view(P, G), full.view(P, G)[order], atol=1e-12)


def test_posterior_prior_by_moments():
    # Corrected means 0, 0.5, 1 with rho = 0: m = 0.5, Var(p^) = 0.25 minus the sampling part mean(q(1-q)/n)
    # = (0 + 0.25/4 + 0) / 3 = 1/48 -> Var(p) = 11/48, a + b = 0.25 / (11/48) - 1 = 1/11 -> clipped up to 2.
    grouped = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=F64)
    a, b = posterior_prior(grouped, RowRates.of(FlipRates(), 3))
    assert (a, b) == pytest.approx((1.0, 1.0))
    # Identical groups: no spread beyond sampling, so the prior is as strong as allowed, at the mean accuracy.
    same = torch.tensor([[1, 0, 1, 0]] * 4, dtype=F64)
    a, b = posterior_prior(same, RowRates.of(FlipRates(), 4))
    assert (a, b) == pytest.approx((50.0, 50.0))


def test_unscorable_completions_are_left_out_of_the_posterior():
    rewards = torch.tensor([1, math.nan, 0, 0, 1, 0], dtype=F64)
    adv = noise_corrected_advantages(rewards, 3, FlipRates(0.1, 0.1), "posterior", "none", prior=(1.0, 1.0))
    assert adv[1] == 0 and adv[0] > 0 > adv[2]
    assert torch.allclose(adv[:3].sum(), torch.tensor(0.0, dtype=F64), atol=1e-12)


def test_forward_refuses_false_positives_and_posterior_needs_no_std():
    rewards = torch.tensor([1, 0, 0, 1], dtype=F64)
    with pytest.raises(ValueError, match="correction='forward' assumes rho_plus = 0.*use correction='posterior'"):
        noise_corrected_advantages(rewards, 4, FlipRates(0.1, 0.2), "forward", "none")
    with pytest.raises(ValueError, match="set scale_rewards='none'"):
        noise_corrected_advantages(rewards, 4, FlipRates(0.1, 0.2), "posterior", "group")
    with pytest.raises(ValueError, match="binary"):
        noise_corrected_advantages(torch.tensor([1, 0.5], dtype=F64), 2, FlipRates(0.1, 0.2), "posterior", "none")
    with pytest.raises(ValueError, match="grpo.correction='forward' assumes rho_plus = 0"):
        GRPOConfig(correction="forward", rho_plus=0.1, rho_minus=0.2)
    with pytest.raises(ValueError, match="grpo.correction='forward' assumes rho_plus = 0"):
        GRPOConfig(correction="forward", rho_minus=0.2, group_rates="a=0.0:0.1,b=0.2:0.1")
    with pytest.raises(ValueError, match="grpo.correction='posterior' divides by no std"):
        GRPOConfig(correction="posterior", rho_plus=0.1, scale_rewards="group")
    assert GRPOConfig(correction="posterior", rho_plus=0.1, scale_rewards="none").correction == "posterior"
    assert GRPOConfig(correction="forward", rho_minus=0.2).correction == "forward"
