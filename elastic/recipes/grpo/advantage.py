"""Group-relative advantages (TRL GRPOTrainer conventions) with optional noise correction.

Layout, as in TRL: ``rewards`` is a flat [P * G] tensor in which the G = ``num_generations``
completions of each prompt are consecutive (TRL's ``repeat_interleave`` / ``RepeatSampler`` order).
Advantages need the rewards of whole groups (and, for ``scale_rewards="batch"``, of the whole
batch), so the engine computes them after gathering the rewards, exactly as TRL does.

Plain advantages (``correction="none"``), following TRL's ``_generate_and_score_completions``:

    mean_g  = mean of the group's rewards
    std     = torch.std of the group ("group") or of the whole batch ("batch"); unbiased (Bessel)
    A_i     = (r_i - mean_g) / (std + 1e-4), or A_i = r_i - mean_g when scale_rewards == "none"

The mean is always per group; ``scale_rewards`` only picks the std.

Noise-corrected advantages (arXiv:2510.18924), with d = 1 - rho_plus - rho_minus:

- ``"dr_grpo"`` (no std scaling): A_i = (r~_i - mean_g r~) / d. This is the group-centred
  corrected reward r^ = (r~ - rho_plus) / d, so its expectation is the clean Dr. GRPO advantage.
- ``"grpo"`` (std-normalised): z-scoring the corrected reward would cancel d again, so divide by an
  estimate of the *clean* std instead. For 0/1 rewards the std is sqrt(p (1 - p)), and the clean
  success rate is estimated from the observed mean:
      p^* = clip((mean r~ - rho_plus) / d, 0, 1),  s^* = sqrt(p^* (1 - p^*))
      A_i = (r~_i - mean_g r~) / (d * s^* + eps)
  With ``scale_rewards="group"`` the means in p^* are per group; with ``"batch"`` over the batch.
  Note s^* is a population std (no Bessel factor), so with rho = 0 this differs from TRL's
  group-scaled advantage by about sqrt(G / (G - 1)).

Per-group rates (``rates.RowRates``, one entry per prompt): every formula above takes its own prompt's
rho_plus, rho_minus and d, so a noisier group's advantages are scaled up by its 1/d_g relative to the
others'. That relative weighting is what AdamW's global normalisation does not undo
(``docs/grpo_noise.md``).

- ``"posterior"`` (ours; derivation in ``docs/grpo_noise.md``, no std scaling): each completion's reward is
  replaced by E[r*_i | the group's observed rewards, its rates, a Beta(a, b) prior on the group's clean
  accuracy], summed exactly over the latent true counts (O(G^2) terms per group), then centred per group.
  With exchangeable noise this is a per-group weight (c1 - c0) on the centred noisy reward, where c1 (c0) is
  the posterior mean of r* of an observed 1 (0): a group that is probably noise (one observed success where
  false positives are common) is shrunk, the opposite of ``grpo``'s floor. The prior is fitted once per call
  by the method of moments on all groups' corrected means (``posterior_prior``): a batch statistic, like
  ``scale_rewards="batch"``'s std, so the engine computes it on the gathered global batch; given the prior,
  each group's advantages depend on that group only (split-invariant).

- ``"forward"`` (after Cai et al., arXiv:2510.00915, which describes a forward correction that
  re-weights the score-function terms and needs only rho_minus; we could read its abstract, not its
  algorithm, so this is our derivation of one with those two properties). With rho_plus = 0 an
  observed 1 is a true 1, and an observed 0 is a missed 1 with posterior probability
      q = rho_minus p / (rho_minus p + 1 - p),  p = clip(mean_g r~ / (1 - rho_minus), 0, 1)
  the group's clean success rate. Each observed 0 is replaced by q (its expected true reward), then
  TRL's advantages are taken with the configured ``scale_rewards``. Observed negatives of a group
  that succeeds often are thus pushed down less: their score-function terms are down-weighted. It assumes
  rho_plus = 0 and refuses any row with rho_plus > 0 (use ``"posterior"``, which handles both rates).

Unscorable completions (NaN: every reward function returned None), as TRL's ``GRPOTrainer`` treats them:
excluded from their group's mean and std (nanmean, Bessel-corrected nanstd), and given advantage 0.

Caution on ``"grpo"``: when p^* clips to 0 or 1 while the observed rewards of a group still differ
(e.g. one observed success that the rates attribute to noise), s^* = 0 and the advantages become
(r~_i - mean) / eps, i.e. thousands for eps = 1e-4. Callers that meet this should raise ``eps``.
"""

from __future__ import annotations

import torch

from elastic.recipes.grpo.noise import FlipRates
from elastic.recipes.grpo.rates import RowRates

SCALE_REWARDS = ("group", "batch", "none")
CORRECTIONS = ("none", "grpo", "dr_grpo", "forward", "posterior")
PRIOR_STRENGTH = (2.0, 100.0)  # bounds on a + b of the fitted Beta prior (see posterior_prior)
STD_EPS = 1e-4  # TRL's constant in (r - mean) / (std + 1e-4)


def _grouped(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Rewards as [P, G] after checking the layout (NaN marks an unscorable completion)."""
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 2:
        raise ValueError(
            f"num_generations={num_generations!r} must be an integer >= 2: a group-relative advantage compares "
            "each completion with the other completions of its prompt, so every prompt needs at least 2"
        )
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a flat [P * G] tensor, got shape {tuple(rewards.shape)}")
    if rewards.numel() == 0 or rewards.numel() % num_generations:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of num_generations={num_generations}; "
            "pass every completion of each prompt (the global batch must be a multiple of num_generations)"
        )
    if bool(torch.isinf(rewards).any()):
        raise ValueError("rewards contain infinity; check the reward function (NaN marks an unscorable completion)")
    return rewards.view(-1, num_generations)


def nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """TRL's ``nanstd``: the Bessel-corrected std of the non-NaN values (NaN with fewer than 2)."""
    if dim is None:
        values, dim = values.reshape(-1), 0
    mean = values.nanmean(dim=dim, keepdim=True)
    count = (~values.isnan()).sum(dim=dim)
    variance = ((values - mean) ** 2).nanmean(dim=dim) * count / (count - 1).clamp(min=1)
    return torch.where(count > 1, variance.sqrt(), torch.full_like(variance, torch.nan))


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group",
                     eps: float = STD_EPS) -> torch.Tensor:
    """TRL's GRPO advantages of ``rewards`` [P * G]; see the module docstring."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r} is not one of {SCALE_REWARDS}")
    grouped = _grouped(rewards, num_generations)
    centred = (grouped - grouped.nanmean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "none":
        return centred.nan_to_num(nan=0.0)
    if scale_rewards == "group":
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    else:
        std = nanstd(rewards).expand_as(rewards)  # one std for all; _grouped guarantees >= 2 values
    return (centred / (std + eps)).nan_to_num(nan=0.0)


def clean_std_estimate(observed_mean: torch.Tensor, rates: FlipRates | RowRates) -> torch.Tensor:
    """s^* = sqrt(p^* (1 - p^*)) with p^* = clip((mean r~ - rho_plus) / d, 0, 1) (per row when rates are)."""
    p_star = ((observed_mean - rates.rho_plus) / rates.scale).clamp(0.0, 1.0)
    return (p_star * (1 - p_star)).sqrt()


def forward_corrected_rewards(grouped: torch.Tensor, rho_minus: torch.Tensor) -> torch.Tensor:
    """The forward correction's rewards [P, G]: each observed 0 replaced by the probability that it is a
    false negative, given its group (see the module docstring); observed 1s stay 1."""
    p_hat = (grouped.nanmean(dim=1, keepdim=True) / (1 - rho_minus)).clamp(0.0, 1.0)
    missed = rho_minus * p_hat
    posterior = torch.where(missed > 0, missed / (missed + 1 - p_hat).clamp(min=1e-12), torch.zeros_like(missed))
    return grouped + (1 - grouped) * posterior


def posterior_prior(grouped: torch.Tensor, rows: RowRates) -> tuple[float, float]:
    """The empirical-Bayes Beta(a, b) prior of a group's clean accuracy, by the method of moments over the groups.

    Each group's corrected mean p^_g = clip((mean r~_g - rho_plus_g) / J_g, 0, 1) has variance Var(p) plus its
    sampling variance q_g (1 - q_g) / (n_g J_g^2) (q_g = mean r~_g, n_g scorable completions); subtracting the
    latter leaves Var(p), and a + b = m (1 - m) / Var(p) - 1. Few groups estimate Var(p) badly, so a + b is
    kept in ``PRIOR_STRENGTH`` (2: nearly flat; 100: every group near the batch's mean accuracy).
    """
    a, b = posterior_prior_batched(grouped, rows.rho_plus, rows.rho_minus)
    return float(a), float(b)


def posterior_prior_batched(grouped: torch.Tensor, rho_plus: torch.Tensor, rho_minus: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``posterior_prior`` of many batches at once: ``grouped`` [..., P, G], rates [..., P] -> a, b [...]."""
    scorable = ~grouped.isnan()
    n = scorable.sum(dim=-1).to(grouped.dtype)
    keep = (n > 0).to(grouped.dtype)
    groups = keep.sum(dim=-1)
    q = grouped.nan_to_num(nan=0.0).sum(dim=-1) / n.clamp(min=1)
    scale = 1 - rho_plus - rho_minus
    p_hat = ((q - rho_plus) / scale).clamp(0.0, 1.0)
    m = ((p_hat * keep).sum(dim=-1) / groups.clamp(min=1)).clamp(0.01, 0.99)
    m = torch.where(groups > 0, m, torch.full_like(m, 0.5))
    spread = ((p_hat - m[..., None]) ** 2 * keep).sum(dim=-1) / (groups - 1).clamp(min=1)  # unbiased over groups
    sampling = (q * (1 - q) / (n.clamp(min=1) * scale**2) * keep).sum(dim=-1) / groups.clamp(min=1)
    var = spread - sampling
    lo, hi = PRIOR_STRENGTH
    strength = torch.where(var > 0, (m * (1 - m) / var.clamp(min=1e-300) - 1).clamp(lo, hi), torch.full_like(m, hi))
    strength = torch.where(groups < 2, torch.full_like(m, lo), strength)  # one group: no spread to measure
    return m * strength, (1 - m) * strength


def posterior_rewards(grouped: torch.Tensor, rows: RowRates, prior: tuple) -> torch.Tensor:
    """E[r*_i | the group's observed rewards] [..., P, G] (NaN stays NaN), exact under the flip channel ``rows``
    ([..., P]) and a Beta(a, b) prior on the group's clean accuracy p (floats, or tensors [...] per batch);
    ``docs/grpo_noise.md`` derives it.

    Given p the completions are independent, so the observed counts (k ones of n scorable) decompose into j true
    ones among the k observed ones and m among the n - k observed zeros, with weight
        C(k, j) (1 - rho-)^j rho+^(k - j)  C(n - k, m) rho-^m (1 - rho+)^(n - k - m)  B(a + j + m, b + n - j - m).
    An observed 1's posterior mean is E[j] / k, an observed 0's E[m] / (n - k): O(G^2) terms per group.
    """
    G = grouped.shape[-1]
    observed = grouped.nan_to_num(nan=0.0)
    scorable = ~grouped.isnan()
    n_int = scorable.sum(dim=-1)[..., None, None]  # [..., P, 1, 1]
    k_int = observed.sum(dim=-1).round().long()[..., None, None]
    span = torch.arange(G + 1)
    j, m = span[:, None], span[None, :]
    valid = (j <= k_int) & (m <= n_int - k_int)
    jj, mm = torch.minimum(j, k_int), torch.minimum(m, n_int - k_int)  # in range where invalid, masked below
    # lgamma only on tables (log factorials; lgamma(a + s) and lgamma(b + t) for s, t in 0..2G), then gathered:
    # the sums below take integer arguments, and lgamma dominated the cost when evaluated per term.
    log_fact = torch.lgamma(torch.arange(2 * G + 2, dtype=grouped.dtype) + 1)
    a, b = (torch.as_tensor(x, dtype=grouped.dtype)[..., None] + torch.arange(2 * G + 1, dtype=grouped.dtype)
            for x in prior)  # [..., 2G + 1]
    lg_a, lg_b = torch.lgamma(a), torch.lgamma(b)
    lead = grouped.shape[:-1]

    def table(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """values [..., T] at index [..., P, G + 1, G + 1] (a per-batch table read by every group)."""
        flat = index.expand(*lead, G + 1, G + 1).flatten(-2)
        return values[..., None, :].expand(*lead, values.shape[-1]).gather(-1, flat).view(*lead, G + 1, G + 1)

    def log_choose(top: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
        return log_fact[top] - log_fact[pick] - log_fact[top - pick]

    rho_plus, rho_minus = rows.rho_plus[..., None, None], rows.rho_minus[..., None, None]
    k, n, jf, mf = k_int.to(grouped.dtype), n_int.to(grouped.dtype), jj.to(grouped.dtype), mm.to(grouped.dtype)
    log_w = (log_choose(k_int, jj) + torch.xlogy(jf, 1 - rho_minus) + torch.xlogy(k - jf, rho_plus)
             + log_choose(n_int - k_int, mm) + torch.xlogy(mf, rho_minus) + torch.xlogy(n - k - mf, 1 - rho_plus)
             + table(lg_a, jj + mm) + table(lg_b, n_int - jj - mm))
    log_w = torch.where(valid, log_w, torch.full_like(log_w, -torch.inf))
    w = torch.softmax(log_w.flatten(-2), dim=-1).view_as(log_w)  # normalised: the posterior over (j, m)
    true_ones = (w * jf).sum(dim=(-2, -1)) / k[..., 0, 0].clamp(min=1)  # c1: an observed 1 is a true 1
    true_zeros = (w * mf).sum(dim=(-2, -1)) / (n - k)[..., 0, 0].clamp(min=1)  # c0: an observed 0 is a true 1
    out = torch.where(observed == 1, true_ones[..., None], true_zeros[..., None])
    return torch.where(scorable, out, torch.full_like(out, torch.nan))


def std_floor_for(num_generations: int) -> float:
    """The smallest clean std the grpo correction divides by: that of a success rate of 1/(4G).

    A group's clean success rate cannot be resolved much below 1/G, yet the estimate p^* clips to 0
    (or 1) whenever the observed mean falls below rho_plus (above 1 - rho_minus); dividing by
    sqrt(p^*(1 - p^*)) + eps would then blow a single noisy reward up by 1/eps (10^4). The floor
    keeps such groups' advantages on the scale of the others'. (Our choice; the brief's formula has none.)
    """
    q = 1.0 / (4 * num_generations)
    return (q * (1 - q)) ** 0.5


def noise_corrected_advantages(rewards: torch.Tensor, num_generations: int, rates: FlipRates | RowRates,
                               correction: str, scale_rewards: str = "group", eps: float = STD_EPS,
                               std_floor: float | None = None, prior: tuple[float, float] | None = None
                               ) -> torch.Tensor:
    """Advantages of observed rewards ``rewards`` [P * G] under the flip channel ``rates``: constant
    ``FlipRates``, or ``RowRates`` with one entry per prompt (its rate group's rates).

    ``correction="none"`` returns TRL's plain advantages (``rates`` unused). ``"grpo"`` floors the
    estimated clean std (``std_floor``, default ``std_floor_for(G)``; 0 disables it). ``"dr_grpo"`` and
    ``"posterior"`` require ``scale_rewards="none"`` (a per-group std would undo their per-group weights) and
    ``"grpo"`` requires "group" or "batch" (where to estimate p^*; "batch" needs constant rates), so that a
    config cannot silently combine a correction with a scaling it does not use. ``"forward"`` uses only
    rho_minus, refuses rho_plus > 0, and takes any ``scale_rewards``. ``prior``: the posterior's Beta(a, b);
    None fits it on these rewards (``posterior_prior``). Unscorable (NaN) completions get advantage 0.
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"correction={correction!r} is not one of {CORRECTIONS}")
    if correction == "none":
        return group_advantages(rewards, num_generations, scale_rewards, eps)
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r} is not one of {SCALE_REWARDS}")
    grouped = _grouped(rewards, num_generations)
    rows = RowRates.of(rates, grouped.shape[0])
    rho_plus, rho_minus, scale = rows.rho_plus[:, None], rows.rho_minus[:, None], rows.scale[:, None]
    if correction == "forward":
        if bool((rows.rho_plus > 0).any()):
            raise ValueError(f"correction='forward' assumes rho_plus = 0 (an observed 1 is a true 1), but the rates "
                             f"give rho_plus up to {float(rows.rho_plus.max()):.3f}; use correction='posterior', "
                             "which accounts for both rates")
        return group_advantages(forward_corrected_rewards(grouped, rho_minus).reshape(-1), num_generations,
                                scale_rewards, eps)
    if correction in ("dr_grpo", "posterior") and scale_rewards != "none":
        raise ValueError(f"correction={correction!r} weights each group, and a per-group std would undo it, but "
                         f"scale_rewards={scale_rewards!r}; set scale_rewards='none' (or use correction='grpo')")
    if correction == "posterior":
        if bool(((grouped != 0) & (grouped != 1) & ~grouped.isnan()).any()):
            raise ValueError("correction='posterior' models 0/1 rewards flipped by the verifier, and got other "
                             "values; use it with binary (verifiable) rewards only")
        expected = posterior_rewards(grouped, rows, prior or posterior_prior(grouped, rows))
        return (expected - expected.nanmean(dim=1, keepdim=True)).reshape(-1).nan_to_num(nan=0.0)
    group_mean = grouped.nanmean(dim=1, keepdim=True)
    centred = grouped - group_mean
    if correction == "dr_grpo":
        return (centred / scale).reshape(-1).nan_to_num(nan=0.0)
    if scale_rewards == "none":
        raise ValueError("correction='grpo' divides by an estimated clean std, so scale_rewards must say where to "
                         "estimate it: 'group' or 'batch' (or use correction='dr_grpo' for no std scaling)")
    if scale_rewards == "group":
        std = clean_std_estimate(group_mean, RowRates(rho_plus, rho_minus))
    else:
        if not rows.constant:
            raise ValueError("correction='grpo' with scale_rewards='batch' estimates one clean std for the batch, "
                             "which needs one set of rates; use scale_rewards='group' with per-group rates")
        std = clean_std_estimate(rewards.nanmean(), FlipRates(float(rows.rho_plus[0]), float(rows.rho_minus[0])))
    floor = std_floor_for(num_generations) if std_floor is None else std_floor
    return (centred / (scale * std.clamp(min=floor) + eps)).reshape(-1).nan_to_num(nan=0.0)
