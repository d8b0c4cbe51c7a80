"""Noise-corrected GRPO math on plain tensors: rewards, flip noise, advantages, the loss, the config.

Expected numbers are derived by hand in the comments. Everything runs in float64 and in seconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from elastic.core.data import ArithmeticTask
from elastic.core.tokenizer import ByteTokenizer
from elastic.recipes.grpo.advantage import group_advantages, noise_corrected_advantages
from elastic.recipes.grpo.config import GRPOConfig
from elastic.recipes.grpo.loss import GlobalBatch, grpo_loss, grpo_loss_terms
from elastic.recipes.grpo.noise import FlipRates, RewardNoise, corrected_reward
from elastic.recipes.grpo.prompts import pairwise, score_batch
from elastic.recipes.grpo.rates import RateTable, estimate_rates
from elastic.recipes.grpo.rewards import (
    SortDigitsTask,
    arithmetic_reward,
    completion_text,
    resolve_reward,
    sort_digits_reward,
)

F64 = torch.float64


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def close(actual: torch.Tensor, expected, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, t(expected), atol=tol, rtol=0)


# ---------------------------------------------------------------- rewards

def test_arithmetic_reward_is_exact_and_cuts_at_eos_and_newline():
    tok, task = ByteTokenizer(), ArithmeticTask(seq_len=16, num_samples=100)
    for i in range(30):
        p = task.problem(i)
        ids = tok.encode(p.answer, eos=True) + tok.encode("999")  # junk after EOS is never seen
        assert arithmetic_reward(p.prompt, completion_text(ids)) == 1.0
        assert arithmetic_reward(p.prompt, f" {p.answer}\nthen more") == 1.0
        assert arithmetic_reward(p.prompt, p.answer + "0") == 0.0
        assert arithmetic_reward(p.prompt, "") == 0.0


def test_sort_digits_task_is_deterministic_fixed_length_and_split_by_hash():
    a, b = SortDigitsTask(32, 1000, seed=3), SortDigitsTask(32, 1000, seed=3)
    train = [a.problem(i) for i in range(300)]
    holdout = [a.problem(i, "holdout") for i in range(300)]
    assert train == [b.problem(i) for i in range(300)]
    assert {len(a.prompt_ids(i)) for i in range(50)} == {a.prompt_len}
    assert not {p.prompt for p in train} & {p.prompt for p in holdout}
    for p in train[:20]:
        assert p.answer == "".join(sorted(p.prompt[5:-1]))
        assert sort_digits_reward(p.prompt, p.answer) == 1.0
        assert sort_digits_reward(p.prompt, p.answer[::-1]) == float(p.answer == p.answer[::-1])
    inputs, labels = a.sample(0)
    assert inputs.shape == labels.shape == (32,)


def test_resolve_reward_accepts_names_callables_and_import_paths():
    assert resolve_reward("arithmetic")("2+2=", "4") == 1.0
    assert resolve_reward("elastic.recipes.grpo.rewards:sort_digits_reward")("sort 312=", "123") == 1.0
    assert resolve_reward(len) is len
    with pytest.raises(ValueError, match="neither a built-in task"):
        resolve_reward("no_such_task")
    with pytest.raises(ValueError, match="cannot load reward function"):
        resolve_reward("elastic.recipes.grpo.rewards:missing")


def score(fn, prompts, completions):
    """A one-pair reward function scored the way GRPO scores it (``grpo.reward_fn``)."""
    return score_batch([("fn", pairwise(fn))], prompts, completions, {}, [[0]] * len(prompts))


def test_bad_reward_functions_name_the_prompt():
    def raises(prompt, completion):
        raise KeyError("boom")

    with pytest.raises(ValueError, match=r"raised KeyError.*on prompt '1\+1='"):
        score(raises, ["1+1="], ["2"])
    with pytest.raises(ValueError, match=r"returned 'yes' \(str\) for prompt '3\+4='"):
        score(lambda p, c: "yes", ["3+4="], ["7"])
    with pytest.raises(ValueError, match=r"returned nan for prompt '5-2='"):
        score(lambda p, c: float("nan"), ["5-2="], ["3"])
    close(score(lambda p, c: len(c), ["a", "b"], ["xy", ""]), [2.0, 0.0])


def test_a_completion_no_reward_function_scores_gets_zero_advantage_as_in_trl():
    """TRL's GRPOTrainer: every function None -> the completion is NaN, left out of its group's nanmean and
    (Bessel) nanstd, and its advantage is set to 0; a pairwise function may return None too."""
    rewards = score(lambda p, c: None if c == "?" else float(c == "7"), ["3+4="] * 4, ["7", "?", "1", "7"])
    assert rewards[1].isnan() and torch.equal(rewards[[0, 2, 3]], t([1, 0, 1]))
    rewards = torch.cat([rewards, t([1, 0, math.nan, math.nan])])
    # group 1: mean of (1, 0, 1) = 2/3, std sqrt(1/3); group 2: one scorable pair mean 0.5, std sqrt(0.5)
    close(group_advantages(rewards, 4, "none"), [1 / 3, 0, -2 / 3, 1 / 3, 0.5, -0.5, 0, 0])
    s1, s2 = math.sqrt(1 / 3) + 1e-4, math.sqrt(0.5) + 1e-4
    close(group_advantages(rewards, 4, "group"), [1 / 3 / s1, 0, -2 / 3 / s1, 1 / 3 / s1, 0.5 / s2, -0.5 / s2, 0, 0])
    # A group with one scorable completion: TRL's nanstd is NaN, so all its advantages become 0.
    close(group_advantages(t([1, math.nan, math.nan, math.nan]), 4, "group"), [0, 0, 0, 0])
    for correction, scale in (("dr_grpo", "none"), ("grpo", "group"), ("posterior", "none")):
        adv = noise_corrected_advantages(rewards, 4, FlipRates(0.1, 0.1), correction, scale)
        assert adv[1] == 0 and adv[6] == 0 and adv[7] == 0 and bool(adv.isfinite().all()), correction
    observed = RewardNoise(FlipRates(0.5, 0.5 - 1e-9), seed=0).observe(t([math.nan, 1]), [0, 0], [0, 1])
    assert observed[0].isnan()


# ---------------------------------------------------------------- noise

@pytest.mark.parametrize("rates", [(-0.1, 0.0), (1.0, 0.0), (0.0, 1.0), (0.6, 0.4), (0.7, 0.5), (math.nan, 0.0)])
def test_flip_rates_out_of_range_are_rejected(rates):
    with pytest.raises(ValueError, match="rho_plus|rho_minus"):
        FlipRates(*rates)


def test_corrected_reward_by_hand():
    # d = 1 - 0.1 - 0.2 = 0.7; r~=1 -> (1 - 0.1)/0.7 = 1.285714; r~=0 -> (0 - 0.1)/0.7 = -0.142857
    close(corrected_reward(t([1.0, 0.0]), FlipRates(0.1, 0.2)), [1.2857142857, -0.1428571429])


@pytest.mark.parametrize("clean_value", [0.0, 1.0])
def test_corrected_reward_is_unbiased_monte_carlo(clean_value):
    rates, n = FlipRates(0.2, 0.1), 200_000
    noise = RewardNoise(rates, seed=7)
    observed = noise.observe(torch.full((n,), clean_value, dtype=F64), range(n), [i % 8 for i in range(n)])
    flip_rate = rates.rho_plus if clean_value == 0 else rates.rho_minus
    flips = (observed != clean_value).to(F64)
    assert abs(flips.mean() - flip_rate) < 5 * math.sqrt(flip_rate * (1 - flip_rate) / n)
    r_hat = corrected_reward(observed, rates)
    standard_error = r_hat.std() / math.sqrt(n)
    assert abs(r_hat.mean() - clean_value) < 5 * standard_error, (float(r_hat.mean()), float(standard_error))


def test_noise_does_not_depend_on_the_split_into_workers():
    noise = RewardNoise(FlipRates(0.3, 0.3), seed=1)
    clean = (torch.arange(24) % 3 == 0).to(F64)
    prompts = [100 + i // 4 for i in range(24)]
    full = noise.observe_groups(clean, sorted(set(prompts)), num_generations=4, step=5)
    shards = [noise.observe(clean[lo:hi], prompts[lo:hi], [i % 4 for i in range(lo, hi)], step=5)
              for lo, hi in ((0, 5), (5, 6), (6, 24))]
    assert torch.equal(full, torch.cat(shards))
    assert not torch.equal(full, noise.observe_groups(clean, sorted(set(prompts)), 4, step=6))  # fresh per step
    with pytest.raises(ValueError, match="not 0 or 1"):
        noise.observe(t([0.5]), [0], [0])


def test_flip_rate_estimation():
    # gold 0 x4, one observed 1 -> rho_plus = 1/4; gold 1 x3, one observed 0 -> rho_minus = 1/3
    table, (est,) = estimate_rates(t([0, 0, 0, 0, 1, 1, 1]), t([1, 0, 0, 0, 0, 1, 1]), [""] * 7, min_per_class=1)
    assert (est.rates.rho_plus, est.rates.rho_minus) == (0.25, 1 / 3) and table.of("") == est.rates
    with pytest.raises(ValueError, match="rate group '\\(all\\)' has 0 calibration samples with gold label 0"):
        estimate_rates(t([1, 1]), t([1, 0]), ["", ""], min_per_class=1)
    with pytest.raises(ValueError, match="group .b. has 1 calibration samples with gold label 1, fewer than the 2"):
        estimate_rates(t([0, 0, 1, 1, 0, 0, 1]), t([0, 0, 1, 1, 0, 0, 1]), list("aaaabbb"), min_per_class=2)
    with pytest.raises(ValueError, match="J = 0.000 <= 0: the verifier carries no signal"):  # 1/2 + 1/2 = 1
        estimate_rates(t([0, 0, 1, 1]), t([1, 0, 0, 1]), ["x"] * 4, min_per_class=1)
    # From the simulated channel, two groups: estimates within 5 standard errors, inside their 95% intervals.
    n = 20_000
    gold = (torch.arange(n) % 2).to(F64)
    groups = ["easy" if i % 4 < 2 else "hard" for i in range(n)]
    truth = RateTable({"easy": FlipRates(0.05, 0.1), "hard": FlipRates(0.3, 0.25)})
    observed = RewardNoise(FlipRates(), seed=2).observe(gold, range(n), [0] * n, split="calib",
                                                         rates=truth.rows(groups))
    table, estimates = estimate_rates(gold, observed, groups)
    for e in estimates:
        true = truth.of(e.group)
        assert abs(e.rates.rho_plus - true.rho_plus) < 5 * math.sqrt(true.rho_plus * (1 - true.rho_plus) / (n / 4))
        assert abs(e.rates.rho_minus - true.rho_minus) < 5 * math.sqrt(true.rho_minus * (1 - true.rho_minus) / (n / 4))
        assert e.rho_plus_ci[0] < e.rates.rho_plus < e.rho_plus_ci[1] and e.negatives == n // 4
    with pytest.raises(ValueError, match="prompt group 'other' has no flip rates"):
        table.of("other")


# ---------------------------------------------------------------- advantages

REWARDS = t([1, 0, 0, 1, 1, 1, 1, 0])  # two groups of G = 4; means 0.5 and 0.75


def test_scale_rewards_variants_by_hand():
    # none: r - group mean
    close(group_advantages(REWARDS, 4, "none"), [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75])
    # group: group 1 std = sqrt((4 * 0.25) / 3) = 0.5773503 -> +-0.5 / 0.5774503 = +-0.8658754;
    #        group 2 std = sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5 -> 0.25 / 0.5001, -0.75 / 0.5001
    close(group_advantages(REWARDS, 4, "group"),
          [0.8658754, -0.8658754, -0.8658754, 0.8658754, 0.4999000, 0.4999000, 0.4999000, -1.4997001])
    # batch: mean 5/8, sum of squares 5 * 0.375^2 + 3 * 0.625^2 = 1.875, std = sqrt(1.875 / 7) = 0.5175492;
    #        the centring is still per group: 0.5 / 0.5176492 = 0.9659052 etc.
    close(group_advantages(REWARDS, 4, "batch"),
          [0.9659052, -0.9659052, -0.9659052, 0.9659052, 0.4829526, 0.4829526, 0.4829526, -1.4488577])
    # a constant group gets zero advantages (0 / (0 + 1e-4)); [0, 1] has std sqrt(0.5) = 0.7071068
    close(group_advantages(t([1, 1, 0, 1]), 2, "group"), [0, 0, -0.5 / (math.sqrt(0.5) + 1e-4), 0.5 / 0.7072068])


def test_corrections_by_hand():
    rates = FlipRates(0.1, 0.2)  # d = 0.7
    # none: TRL's plain advantages of the observed rewards
    assert torch.equal(noise_corrected_advantages(REWARDS, 4, rates, "none", "group"),
                       group_advantages(REWARDS, 4, "group"))
    # dr_grpo: centred / 0.7 -> 0.5 / 0.7 = 0.7142857, 0.25 / 0.7 = 0.3571429, -0.75 / 0.7 = -1.0714286
    close(noise_corrected_advantages(REWARDS, 4, rates, "dr_grpo", "none"),
          [0.7142857, -0.7142857, -0.7142857, 0.7142857, 0.3571429, 0.3571429, 0.3571429, -1.0714286])
    # grpo, per group: group 1 p* = (0.5 - 0.1) / 0.7 = 4/7, s* = sqrt(12)/7, d s* = sqrt(12)/10 = 0.3464102
    #   -> 0.5 / 0.3465102 = 1.4429591; group 2 p* = 0.65 / 0.7 = 13/14, d s* = sqrt(13)/20 = 0.1802776
    #   -> 0.25 / 0.1803776 = 1.3859817, -0.75 / 0.1803776 = -4.1579451
    close(noise_corrected_advantages(REWARDS, 4, rates, "grpo", "group"),
          [1.4429591, -1.4429591, -1.4429591, 1.4429591, 1.3859817, 1.3859817, 1.3859817, -4.1579451])
    # grpo, batch: p* = (0.625 - 0.1) / 0.7 = 0.75, d s* = 0.7 sqrt(3)/4 = 0.3031089 -> 0.5 / 0.3032089 = 1.6490282
    close(noise_corrected_advantages(REWARDS, 4, rates, "grpo", "batch"),
          [1.6490282, -1.6490282, -1.6490282, 1.6490282, 0.8245141, 0.8245141, 0.8245141, -2.4735422])
    # With zero rates dr_grpo is TRL's scale_rewards="none".
    assert torch.equal(noise_corrected_advantages(REWARDS, 4, FlipRates(), "dr_grpo", "none"),
                       group_advantages(REWARDS, 4, "none"))
    # Clipping: [1, 0, 0, 0] with rho_plus = 0.3 gives p* = clip((0.25 - 0.3)/0.7) = 0, s* = 0. Without a
    # floor the advantages are centred / eps (10^4 times too large); the default floor is the std of a
    # success rate q = 1/(4G) = 1/16: sqrt(15/256) = 0.2420615, d * floor + eps = 0.1695430
    #   -> 0.75 / 0.1695430 = 4.4236560, -0.25 / 0.1695430 = -1.4745520.
    close(noise_corrected_advantages(t([1, 0, 0, 0]), 4, FlipRates(0.3, 0.0), "grpo", "group"),
          [4.4236560, -1.4745520, -1.4745520, -1.4745520])
    close(noise_corrected_advantages(t([1, 0, 0, 0]), 4, FlipRates(0.3, 0.0), "grpo", "group", std_floor=0.0),
          [7500.0, -2500.0, -2500.0, -2500.0], tol=1e-6)
    close(noise_corrected_advantages(t([1, 0, 0, 0]), 4, FlipRates(0.3, 0.0), "grpo", "group", eps=0.5,
                                     std_floor=0.0), [1.5, -0.5, -0.5, -0.5])


def test_dr_grpo_corrected_advantage_is_unbiased_monte_carlo():
    # E[(r~_i - mean r~) / d | r*] = r*_i - mean r*, the clean Dr. GRPO advantage.
    clean_group, groups, rates = t([1, 0, 0, 1, 1, 0, 0, 0]), 20_000, FlipRates(0.2, 0.1)
    clean = clean_group.repeat(groups)
    observed = RewardNoise(rates, seed=11).observe_groups(clean, range(groups), 8)
    adv = noise_corrected_advantages(observed, 8, rates, "dr_grpo", "none").view(groups, 8)
    standard_error = adv.std(dim=0) / math.sqrt(groups)
    assert bool(((adv.mean(dim=0) - (clean_group - 0.375)).abs() < 5 * standard_error).all())


def test_advantage_input_errors():
    with pytest.raises(ValueError, match="num_generations=1 must be an integer >= 2"):
        group_advantages(t([1, 0]), 1)
    with pytest.raises(ValueError, match="num_generations=1"):
        noise_corrected_advantages(t([1, 0]), 1, FlipRates(0.1, 0.1), "dr_grpo", "none")
    with pytest.raises(ValueError, match="do not split into groups"):
        group_advantages(t([1, 0, 1]), 2)
    with pytest.raises(ValueError, match="infinity"):
        group_advantages(t([1, math.inf]), 2)
    with pytest.raises(ValueError, match="scale_rewards='none'"):
        noise_corrected_advantages(REWARDS, 4, FlipRates(0.1, 0.1), "dr_grpo", "group")
    with pytest.raises(ValueError, match="'group' or 'batch'"):
        noise_corrected_advantages(REWARDS, 4, FlipRates(0.1, 0.1), "grpo", "none")


# ---------------------------------------------------------------- loss

# Two sequences of 3 tokens; the second has 2 real tokens. Ratios exp(logp - old) are chosen exactly.
MASK = t([[1, 1, 1], [1, 1, 0]])
RATIOS = [[1.5, 1.0, 0.5], [0.5, 1.1, 2.0]]
ADV = t([2.0, -1.0])


def hand_inputs(requires_grad: bool = False):
    old = t([[-1.0, -2.0, -0.5], [-0.7, -1.3, -2.2]])
    logps = (old + t(RATIOS).log()).detach().requires_grad_(requires_grad)
    # ref - logp = [ln 2, -ln 2, 0] and [0, 0, *]: k3 KL = 2 - ln2 - 1 = 0.3068528 and 0.5 + ln2 - 1 = 0.1931472,
    # which sum to exactly 0.5 (the masked token's KL is irrelevant).
    ref = logps.detach() + t([[math.log(2), -math.log(2), 0.0], [0.0, 0.0, 3.0]])
    return logps, old, ref


def test_each_loss_type_by_hand_with_clip_higher():
    # epsilon = 0.2, epsilon_high = 0.28: clamp(ratio, 0.8, 1.28); loss_t = -min(r A, clamp(r) A)
    # seq 1 (A = 2):  r=1.5 -> -min(3.0, 2.56) = -2.56 (high-clipped); r=1.0 -> -2.0; r=0.5 -> -min(1.0, 1.6) = -1.0
    #   sum -5.56, mean -1.8533333
    # seq 2 (A = -1): r=0.5 -> -min(-0.5, -0.8) = 0.8 (low-clipped); r=1.1 -> 1.1; r=2.0 masked.  sum 1.9, mean 0.95
    logps, old, _ = hand_inputs()
    expected = {
        "grpo": (-1.8533333 + 0.95) / 2,      # -0.4516667: mean of sequence means
        "bnpo": (-5.56 + 1.9) / 5,            # -0.732: 5 completion tokens
        "dr_grpo": (-5.56 + 1.9) / (2 * 3),   # -0.61: batch 2 x max_completion_length 3
        "dapo": (-5.56 + 1.9) / 5,            # -0.732: num_items_in_batch defaults to the 5 tokens
    }
    for loss_type, value in expected.items():
        loss, metrics = grpo_loss(logps, ADV, MASK, old_logps=old, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type)
        close(loss, value)
        # TRL's clip metrics: 1 low-clipped and 1 high-clipped token out of 5
        assert metrics == pytest.approx({"clip_ratio/low_mean": 0.2, "clip_ratio/high_mean": 0.2,
                                         "clip_ratio/region_mean": 0.4})
    # dapo with TRL's num_items_in_batch counting, e.g., a masked-out truncated completion: -3.66 / 6 = -0.61
    close(grpo_loss(logps, ADV, MASK, old_logps=old, epsilon_high=0.28, loss_type="dapo", num_items_in_batch=6)[0],
          -0.61)
    # Symmetric clip (epsilon_high = None -> 0.2): the first token becomes -min(3.0, 2.4) = -2.4, sum -5.4;
    # bnpo = (-5.4 + 1.9) / 5 = -0.7
    close(grpo_loss(logps, ADV, MASK, old_logps=old, loss_type="bnpo")[0], -0.7)


def test_each_loss_type_by_hand_with_kl():
    # beta = 0.1 adds 0.1 * (0.3068528 + 0.1931472 + 0) = 0.05 to sequence 1's sum: -5.56 + 0.05 = -5.51
    logps, old, ref = hand_inputs()
    expected = {"grpo": (-5.51 / 3 + 0.95) / 2, "bnpo": -3.61 / 5, "dr_grpo": -3.61 / 6, "dapo": -3.61 / 5}
    for loss_type, value in expected.items():
        loss, metrics = grpo_loss(logps, ADV, MASK, old_logps=old, ref_logps=ref, beta=0.1, epsilon_high=0.28,
                                  loss_type=loss_type)
        close(loss, value)
        assert metrics["kl"] == pytest.approx(0.5 / 5)  # mean KL over the 5 completion tokens


def test_gradients_by_hand():
    # num_iterations > 1 (explicit old log-probs), bnpo, N = 5. d(ratio)/d(logp) = ratio, so an unclipped
    # token's gradient is -A r / N, and a token where the clipped branch wins gets none:
    #   seq 1: r=1.5 clipped -> 0; r=1.0 -> -2 * 1.0 / 5 = -0.4; r=0.5 unclipped branch wins -> -2 * 0.5 / 5 = -0.2
    #   seq 2: r=0.5 clipped branch wins -> 0; r=1.1 -> 1 * 1.1 / 5 = 0.22; masked -> 0
    logps, old, ref = hand_inputs(requires_grad=True)
    grpo_loss(logps, ADV, MASK, old_logps=old, epsilon_high=0.28, loss_type="bnpo")[0].backward()
    close(logps.grad, [[0.0, -0.4, -0.2], [0.0, 0.22, 0.0]])
    # num_iterations = 1 (old = current, detached): ratio 1, gradient -A / N per token; the k3 KL adds
    # beta * (1 - exp(ref - logp)) / N: token 1 -> 0.1 * (1 - 2) / 5 = -0.02, token 2 -> 0.1 * 0.5 / 5 = 0.01
    logps.grad = None
    loss, _ = grpo_loss(logps, ADV, MASK, ref_logps=ref, beta=0.1, loss_type="bnpo")
    close(loss.detach(), (-2 * 3 + 1 * 2 + 0.1 * 0.5) / 5)  # ratio 1: -A per token plus the KL
    loss.backward()
    close(logps.grad, [[-0.4 - 0.02, -0.4 + 0.01, -0.4], [0.2, 0.2, 0.0]])


def trl_reference(logps, old, ref, adv, mask, eps_low, eps_high, beta, loss_type, max_len):
    """A line-by-line transcription of TRL's single-process _compute_loss aggregation (GA = 1)."""
    old = logps.detach() if old is None else old
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(coef_1 * adv.unsqueeze(1), coef_2 * adv.unsqueeze(1))
    if beta != 0.0:
        per_token = per_token + beta * (torch.exp(ref - logps) - (ref - logps) - 1)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * max_len)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)  # bnpo; dapo with num_items = token count


def random_batch(seed: int = 0, batch: int = 6, width: int = 5, lengths: tuple[int, ...] = (5, 1, 3, 0, 4, 2)):
    """(logps, old, ref, advantages, mask) of ``batch`` completions; the lengths include an empty one."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)[:batch]
    mask = (torch.arange(width) < lengths.unsqueeze(1)).to(F64)
    old = -torch.rand(batch, width, generator=gen, dtype=F64) * 3
    logps = (old + torch.randn(batch, width, generator=gen, dtype=F64) * 0.3).requires_grad_(True)
    ref = old + torch.randn(batch, width, generator=gen, dtype=F64) * 0.2
    adv = torch.randn(batch, generator=gen, dtype=F64)
    return logps, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ("grpo", "bnpo", "dr_grpo", "dapo"))  # the rest: tests/unit/test_trl_knobs.py
@pytest.mark.parametrize("iterations", [1, 2])
def test_matches_trl_and_is_invariant_to_the_split(loss_type, iterations):
    logps, old, ref, adv, mask = random_batch()
    old = None if iterations == 1 else old
    kwargs = dict(epsilon=0.2, epsilon_high=0.28, beta=0.05, loss_type=loss_type)
    full, _ = grpo_loss(logps, adv, mask, old_logps=old, ref_logps=ref, max_completion_length=8, **kwargs)
    reference = trl_reference(logps, old, ref, adv, mask, 0.2, 0.28, 0.05, loss_type, 8)
    torch.testing.assert_close(full, reference, atol=1e-12, rtol=0)
    (full_grad,) = torch.autograd.grad(full, logps)

    # Three "ranks" with uneven shards: each divides its own sum by the GLOBAL normaliser.
    shards = [slice(0, 1), slice(1, 4), slice(4, 6)]
    batch = GlobalBatch.of([mask[s] for s in shards], max_completion_length=8)
    assert batch == GlobalBatch.of(mask, 8)
    terms = [grpo_loss_terms(logps[s], adv[s], mask[s], old_logps=None if old is None else old[s],
                             ref_logps=ref[s], **kwargs) for s in shards]
    losses = [term.loss(batch) for term in terms]
    torch.testing.assert_close(sum(losses), full, atol=1e-12, rtol=0)
    grads = [torch.autograd.grad(loss, logps)[0] for loss in losses]
    torch.testing.assert_close(sum(grads), full_grad, atol=1e-12, rtol=0)
    whole = grpo_loss_terms(logps, adv, mask, old_logps=old, ref_logps=ref, **kwargs).metrics()
    assert (terms[0] + terms[1] + terms[2]).metrics() == pytest.approx(whole)


def test_loss_input_errors():
    logps, old, ref = hand_inputs()
    with pytest.raises(ValueError, match="pass ref_logps"):
        grpo_loss(logps, ADV, MASK, beta=0.1)
    with pytest.raises(ValueError, match="loss_type='sum' is not one of"):
        grpo_loss(logps, ADV, MASK, loss_type="sum")
    with pytest.raises(ValueError, match="advantages must be"):
        grpo_loss(logps, t([1.0]), MASK)
    with pytest.raises(ValueError, match="GlobalBatch.num_sequences=0"):
        GlobalBatch(num_sequences=0, num_tokens=0, max_completion_length=4)


# ---------------------------------------------------------------- config

def test_config_defaults_follow_trl():
    cfg = GRPOConfig()
    assert (cfg.num_generations, cfg.epsilon, cfg.epsilon_high, cfg.beta, cfg.loss_type, cfg.scale_rewards) == (
        8, 0.2, None, 0.0, "dapo", "group")
    assert GRPOConfig(correction="dr_grpo", scale_rewards="none", rho_plus=0.1).flip_rates == FlipRates(0.1, 0.0)


@pytest.mark.parametrize(("fields", "message"), [
    ({"num_generations": 1}, "grpo.num_generations=1 must be an integer >= 2"),
    ({"rho_plus": 1.0}, r"grpo.rho_plus=1.0 must lie in \[0, 1\)"),
    ({"rho_minus": -0.1}, r"grpo.rho_minus=-0.1 must lie in \[0, 1\)"),
    ({"rho_plus": 0.5, "rho_minus": 0.5}, "grpo.rho_plus \\+ grpo.rho_minus = 1 must be < 1"),
    ({"loss_type": "mean"}, "grpo.loss_type='mean'"),
    ({"scale_rewards": "std"}, "grpo.scale_rewards=.std. is not one of"),
    ({"correction": "dr_grpo"}, "set scale_rewards='none'"),
    ({"correction": "grpo", "scale_rewards": "none"}, "'group' or 'batch'"),
    ({"task": "chess"}, "grpo.task='chess'"),
    ({"reward_fn": "not a path"}, "grpo.reward_fn"),
    ({"inject_noise": False, "rho_plus": 0.2}, "set inject_noise=True"),
    ({"epsilon": 1.0}, "grpo.epsilon=1.0"),
    ({"temperature": 0.0}, "grpo.temperature=0.0"),
])
def test_config_errors_name_field_and_fix(fields, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**fields)
