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

- ``"forward"`` (after Cai et al., arXiv:2510.00915, which describes a forward correction that
  re-weights the score-function terms and needs only rho_minus; we could read its abstract, not its
  algorithm, so this is our derivation of one with those two properties). With rho_plus = 0 an
  observed 1 is a true 1, and an observed 0 is a missed 1 with posterior probability
      q = rho_minus p / (rho_minus p + 1 - p),  p = clip(mean_g r~ / (1 - rho_minus), 0, 1)
  the group's clean success rate. Each observed 0 is replaced by q (its expected true reward), then
  TRL's advantages are taken with the configured ``scale_rewards``. Observed negatives of a group
  that succeeds often are thus pushed down less: their score-function terms are down-weighted.

Caution on ``"grpo"``: when p^* clips to 0 or 1 while the observed rewards of a group still differ
(e.g. one observed success that the rates attribute to noise), s^* = 0 and the advantages become
(r~_i - mean) / eps, i.e. thousands for eps = 1e-4. Callers that meet this should raise ``eps``.
"""

from __future__ import annotations

import torch

from elastic.recipes.grpo.noise import FlipRates
from elastic.recipes.grpo.rates import RowRates

SCALE_REWARDS = ("group", "batch", "none")
CORRECTIONS = ("none", "grpo", "dr_grpo", "forward")
STD_EPS = 1e-4  # TRL's constant in (r - mean) / (std + 1e-4)


def _grouped(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Rewards as [P, G] after checking the layout."""
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
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or infinity; check the reward function")
    return rewards.view(-1, num_generations)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group",
                     eps: float = STD_EPS) -> torch.Tensor:
    """TRL's GRPO advantages of ``rewards`` [P * G]; see the module docstring."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r} is not one of {SCALE_REWARDS}")
    grouped = _grouped(rewards, num_generations)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        std = grouped.std(dim=1).repeat_interleave(num_generations)
    else:
        std = rewards.std().expand_as(rewards)  # one std for all; _grouped guarantees >= 2 values
    return centred / (std + eps)


def clean_std_estimate(observed_mean: torch.Tensor, rates: FlipRates | RowRates) -> torch.Tensor:
    """s^* = sqrt(p^* (1 - p^*)) with p^* = clip((mean r~ - rho_plus) / d, 0, 1) (per row when rates are)."""
    p_star = ((observed_mean - rates.rho_plus) / rates.scale).clamp(0.0, 1.0)
    return (p_star * (1 - p_star)).sqrt()


def forward_corrected_rewards(grouped: torch.Tensor, rho_minus: torch.Tensor) -> torch.Tensor:
    """The forward correction's rewards [P, G]: each observed 0 replaced by the probability that it is a
    false negative, given its group (see the module docstring); observed 1s stay 1."""
    p_hat = (grouped.mean(dim=1, keepdim=True) / (1 - rho_minus)).clamp(0.0, 1.0)
    missed = rho_minus * p_hat
    posterior = torch.where(missed > 0, missed / (missed + 1 - p_hat).clamp(min=1e-12), torch.zeros_like(missed))
    return grouped + (1 - grouped) * posterior


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
                               correction: str, scale_rewards: str = "group",
                               eps: float = STD_EPS, std_floor: float | None = None) -> torch.Tensor:
    """Advantages of observed rewards ``rewards`` [P * G] under the flip channel ``rates``: constant
    ``FlipRates``, or ``RowRates`` with one entry per prompt (its rate group's rates).

    ``correction="none"`` returns TRL's plain advantages (``rates`` unused). ``"grpo"`` floors the
    estimated clean std (``std_floor``, default ``std_floor_for(G)``; 0 disables it). ``"dr_grpo"`` requires
    ``scale_rewards="none"`` and ``"grpo"`` requires "group" or "batch" (where to estimate p^*; "batch"
    needs constant rates), so that a config cannot silently combine a correction with a scaling it does
    not use. ``"forward"`` uses only rho_minus and any ``scale_rewards``.
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
        return group_advantages(forward_corrected_rewards(grouped, rho_minus).reshape(-1), num_generations,
                                scale_rewards, eps)
    group_mean = grouped.mean(dim=1, keepdim=True)
    centred = grouped - group_mean
    if correction == "dr_grpo":
        if scale_rewards != "none":
            raise ValueError(f"correction='dr_grpo' divides by no std, but scale_rewards={scale_rewards!r}; "
                             "set scale_rewards='none' (or use correction='grpo')")
        return (centred / scale).reshape(-1)
    if scale_rewards == "none":
        raise ValueError("correction='grpo' divides by an estimated clean std, so scale_rewards must say where to "
                         "estimate it: 'group' or 'batch' (or use correction='dr_grpo' for no std scaling)")
    if scale_rewards == "group":
        std = clean_std_estimate(group_mean, RowRates(rho_plus, rho_minus))
    else:
        if not rows.constant:
            raise ValueError("correction='grpo' with scale_rewards='batch' estimates one clean std for the batch, "
                             "which needs one set of rates; use scale_rewards='group' with per-group rates")
        std = clean_std_estimate(rewards.mean(), FlipRates(float(rows.rho_plus[0]), float(rows.rho_minus[0])))
    floor = std_floor_for(num_generations) if std_floor is None else std_floor
    return (centred / (scale * std.clamp(min=floor) + eps)).reshape(-1)
