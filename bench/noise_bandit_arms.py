"""The bandit's arms: what each one turns the step's rewards into (``noise_bandit.py`` runs them).

Rewards arrive as [R, B, G] for R runs (arm-major: run r = arm * S + seed), B prompts and G samples. Kinds:
- ``clean``: the true reward, group-centred (Dr. GRPO's advantage);
- ``weight``: J_g^kappa times the group-centred observed reward, J_g the prompt's rate group's Youden J (true,
  or estimated per seed with ``estimated``). kappa = 0 is the uncorrected arm; kappa = -1 is the package's
  ``correction="dr_grpo"`` with per-group rates, which ``check_against_package`` confirms;
- ``posterior``: the package's ``posterior_prior_batched`` and ``posterior_rewards`` (true rates), centred:
  exactly ``noise_corrected_advantages(..., "posterior", "none")`` run by run;
- ``std``: TRL's default, the observed reward centred and divided by its group's std + 1e-4 (the package's
  ``group_advantages(..., "group")``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from elastic.recipes.grpo.advantage import (
    STD_EPS,
    group_advantages,
    noise_corrected_advantages,
    posterior_prior_batched,
    posterior_rewards,
)
from elastic.recipes.grpo.rates import RowRates

F64 = torch.float32


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # "clean" | "weight" | "posterior" | "std"
    kappa: float = 0.0  # weight: J_g ** kappa
    estimated: bool = False  # weight: J_g estimated from gold labels, per seed
    beta_factor: float = 1.0  # beta' / beta
    family: str = ""  # what the arm was chosen among ("task weight", "noisy beta'"), or what a "best" arm is
    lr: float = 0.0


def _rows(arms: list[Arm], seeds: int, kind: str) -> torch.Tensor:
    return torch.tensor([a.kind == kind for a in arms for _ in range(seeds)])


def advantages(arms: list[Arm], seeds: int, true: torch.Tensor, observed: torch.Tensor, rho_plus: torch.Tensor,
               rho_minus: torch.Tensor, group: torch.Tensor, j_hat: torch.Tensor) -> torch.Tensor:
    """Each run's advantages [R, B, G]; ``rho_plus``/``rho_minus``/``group`` [R, B] of the batch's prompts,
    ``j_hat`` [R, 4] the estimated J per run's seed and group."""
    out = torch.zeros_like(true)
    centred = observed - observed.mean(-1, keepdim=True)
    clean = _rows(arms, seeds, "clean")
    out[clean] = (true - true.mean(-1, keepdim=True))[clean]
    weight = _rows(arms, seeds, "weight")
    if weight.any():
        kappa = torch.tensor([a.kappa for a in arms for _ in range(seeds)], dtype=F64)[:, None]
        estimated = torch.tensor([a.estimated for a in arms for _ in range(seeds)])[:, None]
        j = torch.where(estimated, j_hat.gather(1, group), 1 - rho_plus - rho_minus)  # [R, B]
        out[weight] = (j[..., None] ** kappa[..., None] * centred)[weight]
    std = _rows(arms, seeds, "std")
    if std.any():
        spread = observed[std].std(-1, keepdim=True)
        out[std] = (observed[std] - observed[std].mean(-1, keepdim=True)) / (spread + STD_EPS)
    post = _rows(arms, seeds, "posterior")
    if post.any():
        rp, rm = rho_plus[post], rho_minus[post]
        expected = posterior_rewards(observed[post], RowRates(rp, rm), posterior_prior_batched(observed[post], rp, rm))
        out[post] = expected - expected.mean(-1, keepdim=True)
    return out


def check_against_package() -> str:
    """The vectorised arms against the package's own per-batch functions on random rewards."""
    gen = torch.Generator().manual_seed(0)
    R, B, G, F64 = 6, 5, 8, torch.float64
    true = (torch.rand(R, B, G, generator=gen, dtype=F64) < 0.4).to(F64)
    observed = (torch.rand(R, B, G, generator=gen, dtype=F64) < 0.4).to(F64)
    rp, rm = torch.rand(R, B, generator=gen, dtype=F64) * 0.4, torch.rand(R, B, generator=gen, dtype=F64) * 0.4
    group = torch.randint(4, (R, B), generator=gen)
    arms = [Arm("dr", "weight", kappa=-1.0), Arm("post", "posterior"), Arm("std", "std")]
    got = advantages(arms, 2, true, observed, rp, rm, group, torch.ones(R, 4, dtype=F64))
    worst = 0.0
    for r in range(R):
        rows = RowRates(rp[r], rm[r])
        flat = observed[r].reshape(-1)
        want = {0: noise_corrected_advantages(flat, G, rows, "dr_grpo", "none"),
                1: noise_corrected_advantages(flat, G, rows, "posterior", "none"),
                2: group_advantages(flat, G, "group")}[r // 2]
        worst = max(worst, float((got[r].reshape(-1) - want).abs().max()))
    if worst > 1e-9:
        return f"WARNING: the bandit's arms differ from the package's advantages by {worst:.2e}"
    return f"check: the bandit's dr_grpo, posterior and std arms equal the package's advantages (max diff {worst:.1e})"
