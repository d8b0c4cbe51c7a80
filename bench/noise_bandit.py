"""Noisy-reward GRPO on a shared-parameter softmax bandit: does a noise correction beat tuning the lr and a task weight?

Problem: 64 prompts x 16 answers; logits X_p @ W with fixed seeded features X [64, d = 6] and learnt W [6, 16],
so every prompt competes for the same 96 parameters. Non-realizable (each prompt's correct answer is random,
so no W gets every prompt right) or a realizable control (the correct answer is argmax X_p @ W*). The prompts
fall into 4 rate groups of 16 with Youden's J = 0.96, 0.8, 0.5, 0.2: symmetric rates (rho+ = rho- = (1 - J)/2)
or an asymmetric variant with the same J. Each step takes a batch of 8 or 64 prompts, G = 8 answers each by
inverse-CDF sampling, flips the true 0/1 reward with the prompt's rates, and takes one AdamW (weight decay 0)
or SGD step on -(1/BG) sum A_i log pi(a_i) + beta KL(pi || uniform) (the exact KL of each batch prompt's
policy from the initial one: on-policy, one step per batch, no ratio, no clipping). Metric: the true
expected accuracy mean_p pi_p(correct_p) over all 64 prompts after the last step (every prompt equally,
as the clean objective weights them).

Arms (advantages; ``noise_bandit_arms.py``): clean (true rewards, centred); noisy (observed, centred);
task weight J_g^kappa times the centred observed reward for kappa in {-1, -1/2, 1/2, 1} (kappa = 0 is noisy,
kappa = -1 is the package's ``dr_grpo`` with the true per-group rates); dr_grpo with rates estimated per seed
from 200 gold labels per class per group; the package's ``posterior`` correction (true rates); noisy at
beta' = beta * mean J * {1/2, 1, 2} (beta > 0 only); TRL's std-normalised advantage of the observed rewards
(secondary). Every arm runs at its own best lr from a 7-point grid a factor 2 apart, chosen on 30 tuning seeds;
the grid is first moved until the clean arm's best lr is inside it (checked, printed). kappa and beta' are
chosen with the lr, on the same seeds. The chosen arms then run on 100 fresh seeds (``--quick``: 10 and 30).

How: every (arm, lr, seed) is one row of batched tensors, gradients are written out analytically, and AdamW
is elementwise, so one setting is a few tensor ops per step. Common random numbers: the batch, the sampling
and the flip uniforms are keyed by (seeds, step), so all arms of a call see the same draws and differences
between arms are paired. The statistics and the decision rule are in ``noise_bandit_report.py``.
Usage: python bench/noise_bandit.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from noise_bandit_arms import Arm, advantages, check_against_package  # noqa: E402

from elastic.core.seeds import stable_seed  # noqa: E402

F64 = torch.float32  # float32: half the memory traffic of float64, and the means need no more
PROMPTS, ANSWERS, D, G, STEPS = 64, 16, 6, 8, 200
GROUP_J = (0.96, 0.8, 0.5, 0.2)
NOISES = {"sym": tuple(((1 - j) / 2, (1 - j) / 2) for j in GROUP_J),
          "asym": ((0.04, 0.0), (0.0, 0.2), (0.4, 0.1), (0.7, 0.1))}  # the same J, rates mostly of one class
GOLD_PER_CLASS = 200  # gold labels per class per group for the estimated rates
BASE_LR = {"adamw": 0.16, "sgd": 2.0}  # grid centres; moved until the clean optimum is inside
GRID = 7  # lrs, a factor 2 apart
MEAN_J = sum(GROUP_J) / len(GROUP_J)
BETA_FACTORS = (0.5 * MEAN_J, MEAN_J, 2 * MEAN_J)  # beta' / beta for "noisy beta'"


@dataclass(frozen=True)
class Setting:
    optimizer: str = "adamw"  # "adamw" | "sgd"
    batch: int = 64  # prompts per step
    beta: float = 0.0
    realizable: bool = False
    noise: str = "sym"  # a key of NOISES

    @property
    def name(self) -> str:
        return (f"{self.optimizer.upper()} batch {self.batch} beta {self.beta:g} {self.noise} "
                f"{'realizable' if self.realizable else 'non-realizable'}")

    def rates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """rho_plus [P], rho_minus [P] and the rate group [P] of each prompt (16 consecutive prompts per group)."""
        group = torch.arange(PROMPTS) * len(GROUP_J) // PROMPTS
        pairs = torch.tensor(NOISES[self.noise], dtype=F64)[group]
        return pairs[:, 0], pairs[:, 1], group


def problem(seeds: list[int], realizable: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Features X [S, P, D] and correct answers [S, P], per seed."""
    xs, correct = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(stable_seed(seed, "noise-bandit", "problem"))
        x = torch.randn(PROMPTS, D, generator=gen, dtype=F64)
        if realizable:
            correct.append((x @ torch.randn(D, ANSWERS, generator=gen, dtype=F64)).argmax(-1))
        else:
            correct.append(torch.randint(ANSWERS, (PROMPTS,), generator=gen))
        xs.append(x)
    return torch.stack(xs), torch.stack(correct)


def estimated_j(seeds: list[int], setting: Setting) -> torch.Tensor:
    """J^ per seed and group [S, 4] from GOLD_PER_CLASS gold labels per class (binomial counts of flips)."""
    rates = torch.tensor(NOISES[setting.noise], dtype=F64)  # [4, 2]
    out = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(stable_seed(seed, "noise-bandit", "calibration", setting.noise))
        flips = (torch.rand(len(GROUP_J), 2, GOLD_PER_CLASS, generator=gen, dtype=F64) < rates[..., None]).sum(-1)
        out.append(1 - flips.sum(-1).to(F64) / GOLD_PER_CLASS)
    return torch.stack(out)


def draws(seeds: list[int], step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's batch [S, B] and its sampling and flip uniforms [S, B, G]: common to every arm of a call."""
    gen = torch.Generator().manual_seed(stable_seed("noise-bandit", tuple(seeds), step))
    idx = torch.rand(len(seeds), PROMPTS, generator=gen).argsort(-1)[:, :batch]
    u = torch.rand(2, len(seeds), batch, G, generator=gen, dtype=F64)
    return idx, u[0], u[1]


def simulate(setting: Setting, arms: list[Arm], seeds: list[int], steps: int = STEPS) -> torch.Tensor:
    """Train every arm on every seed at once; the final true expected accuracy [len(arms), len(seeds)]."""
    S, C = len(seeds), len(arms)
    x, correct = problem(seeds, setting.realizable)
    rho_plus, rho_minus, group = setting.rates()
    seed_of = torch.arange(S).repeat(C)  # run r = arm * S + seed
    j_hat = estimated_j(seeds, setting)[seed_of]  # [R, 4]
    lr = torch.tensor([a.lr for a in arms for _ in seeds], dtype=F64)[:, None, None]
    beta = torch.tensor([setting.beta * a.beta_factor for a in arms for _ in seeds], dtype=F64)[:, None, None]
    w = torch.zeros(C * S, D, ANSWERS, dtype=F64)
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    b1, b2, eps = 0.9, 0.999, 1e-8  # torch's AdamW defaults
    for step in range(steps):
        idx, u_sample, u_flip = draws(seeds, step, setting.batch)
        idx = idx[seed_of]  # [R, B]
        xb = x[seed_of[:, None], idx]  # [R, B, D]
        logp = torch.log_softmax(xb @ w, dim=-1)  # [R, B, A]
        pi = logp.exp()
        answers = torch.searchsorted(pi.cumsum(-1), u_sample[seed_of]).clamp(max=ANSWERS - 1)  # [R, B, G]
        true = (answers == correct[seed_of[:, None], idx][..., None]).to(F64)
        rp, rm = rho_plus[idx][..., None], rho_minus[idx][..., None]
        flip = torch.where(true == 1, u_flip[seed_of] < rm, u_flip[seed_of] < rp)
        observed = torch.where(flip, 1 - true, true)
        adv = advantages(arms, S, true, observed, rho_plus[idx], rho_minus[idx], group[idx], j_hat)
        counts = torch.zeros_like(pi).scatter_add_(-1, answers, adv)
        policy = -(counts - adv.sum(-1, keepdim=True) * pi) / (setting.batch * G)
        kl_terms = logp + math.log(ANSWERS)  # log pi - log pi_ref, pi_ref uniform (the initial policy)
        kl = pi * (kl_terms - (pi * kl_terms).sum(-1, keepdim=True)) / setting.batch
        grad = xb.transpose(1, 2) @ (policy + beta * kl)  # [R, D, A]
        if setting.optimizer == "sgd":
            w -= lr * grad
        else:
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            t = step + 1
            w -= lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    final = torch.softmax(x[seed_of] @ w, dim=-1).gather(-1, correct[seed_of][..., None]).squeeze(-1)
    return final.mean(-1).view(C, S)


def lr_grid(setting: Setting, shift: int = 0) -> list[float]:
    return [BASE_LR[setting.optimizer] * 2.0 ** (k + shift) for k in range(-(GRID // 2), GRID // 2 + 1)]


def tune_clean(setting: Setting, seeds: list[int], log) -> tuple[list[float], torch.Tensor, bool]:
    """The lr grid with the clean arm's best lr inside it: moved by 3 points while the best sits at an edge
    (at most 3 moves). Returns the grid, the clean arm's tuning results [GRID, S] and whether it is inside."""
    shift = 0
    for _ in range(4):
        grid = lr_grid(setting, shift)
        results = simulate(setting, [Arm("clean", "clean", lr=lr) for lr in grid], seeds)
        best = int(results.mean(-1).argmax())
        if 0 < best < GRID - 1:
            return grid, results, True
        log(f"  (clean's best lr {grid[best]:g} is at the grid's edge; moving the grid)")
        shift += 3 if best == GRID - 1 else -3
    return grid, results, False


def candidates(setting: Setting) -> list[Arm]:
    """Every arm other than clean, before its lr is chosen (lr 0: filled in per grid point)."""
    arms = [Arm("noisy", "weight", kappa=0.0), Arm("dr_grpo", "weight", kappa=-1.0),
            Arm("dr_grpo est", "weight", kappa=-1.0, estimated=True), Arm("posterior", "posterior"),
            Arm("trl std", "std")]
    arms += [Arm(f"J^{k:+g}", "weight", kappa=k, family="task weight") for k in (-0.5, 0.5, 1.0)]
    if setting.beta > 0:
        arms += [Arm(f"noisy b'={f * setting.beta:.3g}", "weight", kappa=0.0, beta_factor=f, family="noisy beta'")
                 for f in BETA_FACTORS]
    return arms


@dataclass
class Tuned:
    """One setting's choices on the tuning seeds and its paired results on the report seeds."""

    setting: Setting
    grid: list[float]
    clean_inside: bool
    chosen: list[Arm]  # one per reported arm, at its best lr (and kappa / beta')
    tuning: dict[str, float]  # arm name -> mean tuning accuracy at its chosen lr
    edge: dict[str, bool]  # arm name -> its best lr at the grid's edge
    final: dict[str, torch.Tensor]  # arm name -> [report seeds]


def best_of(arms: list[Arm], results: torch.Tensor) -> tuple[Arm, float, int]:
    i = int(results.mean(-1).argmax())
    return arms[i], float(results[i].mean()), i


def tune_and_report(setting: Setting, tuning: list[int], report: list[int], log) -> Tuned:
    grid, clean_results, inside = tune_clean(setting, tuning, log)
    base = candidates(setting)
    arms = [replace(a, lr=lr) for a in base for lr in grid]
    results = simulate(setting, arms, tuning)
    chosen, scores, edge = [], {}, {}
    clean, score, i = best_of([Arm("clean", "clean", lr=lr) for lr in grid], clean_results)
    chosen.append(clean)
    scores["clean"], edge["clean"] = score, i in (0, GRID - 1)
    for k, arm in enumerate(base):  # each arm at its own best lr
        best, score, i = best_of(arms[k * GRID:(k + 1) * GRID], results[k * GRID:(k + 1) * GRID])
        chosen.append(best)
        scores[arm.name], edge[arm.name] = score, i in (0, GRID - 1)
    for family, pool in (("best kappa", ("noisy", "J^-0.5", "J^+0.5", "J^+1")),
                         ("best beta'", tuple(a.name for a in base if a.family == "noisy beta'"))):
        if pool:
            name = max(pool, key=lambda n: scores[n])
            pick = next(a for a in chosen if a.name == name)
            chosen.append(replace(pick, name=family, family=name))
            scores[family], edge[family] = scores[name], edge[name]
    final = simulate(setting, [a for a in chosen if not a.name.startswith("best ")], report)
    out = dict(zip([a.name for a in chosen if not a.name.startswith("best ")], final, strict=True))
    for a in chosen:
        if a.name.startswith("best "):
            out[a.name] = out[a.family]
    return Tuned(setting, grid, inside, chosen, scores, edge, out)


def settings(quick: bool) -> list[Setting]:
    """The primary AdamW settings (symmetric rates at both batch sizes and both betas; the asymmetric variant at
    both batch sizes), the realizable control and SGD as the secondary optimizer. Not the full factorial: the
    run has to fit 10 to 20 minutes on 2 cores."""
    if quick:
        return [Setting(batch=8), Setting(batch=8, beta=0.05)]
    primary = [Setting("adamw", batch, beta) for batch in (8, 64) for beta in (0.0, 0.05)]
    primary += [Setting("adamw", batch, noise="asym") for batch in (8, 64)]
    control = [Setting("adamw", batch, realizable=True) for batch in (8, 64)]
    secondary = [Setting("sgd", batch) for batch in (8, 64)]
    return primary + control + secondary


def expected_seconds(setting: Setting, measured: dict[Setting, float]) -> float:
    """A setting's expected time from the settings already run: the work per step grows with the batch, and a
    beta > 0 adds three beta' arms to the nine."""
    if not measured:
        return 0.0
    per_unit = sum(t / (s.batch * (1 + (s.beta > 0) / 3)) for s, t in measured.items()) / len(measured)
    return per_unit * setting.batch * (1 + (setting.beta > 0) / 3)


def run(quick: bool, log=print, budget_minutes: float | None = None) -> str:
    """Every setting's table, the Holm-adjusted contrasts and the decision rule's verdict; printed and returned.
    ``budget_minutes``: skip (and list) the settings that would end after it, so the report always prints."""
    from noise_bandit_report import report_all, setting_table

    torch.set_num_threads(1)  # the tensors are small: a second thread costs more than it saves
    log(check_against_package())
    n_tune, n_report = (10, 30) if quick else (30, 100)
    tuning, report = list(range(n_tune)), list(range(10_000, 10_000 + n_report))  # disjoint seeds
    tuned, out, measured, skipped = [], [], {}, []
    started_all = time.perf_counter()
    for setting in sorted(settings(quick), key=lambda s: s.batch):  # cheap settings first
        spent = time.perf_counter() - started_all
        if budget_minutes is not None and spent + expected_seconds(setting, measured) > 60 * budget_minutes:
            skipped.append(f"{setting.name} (expected {expected_seconds(setting, measured) / 60:.0f} min, "
                           f"{budget_minutes - spent / 60:.0f} min of the budget left)")
            continue
        started = time.perf_counter()
        tuned.append(tune_and_report(setting, tuning, report, log))
        measured[setting] = time.perf_counter() - started
        out.append(setting_table(tuned[-1], n_tune, n_report, STEPS) + f"\n({measured[setting]:.0f} s)")
        log(out[-1] + "\n")
    if skipped:
        out.append(f"NOT RUN (time budget of {budget_minutes:g} min on this machine):\n  "
                   + "\n  ".join(skipped))
        log(out[-1] + "\n")
    out.append(report_all(tuned))
    log(out[-1])
    return "\n\n".join(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 settings (batch 8), 10 tuning and 30 report seeds")
    parser.add_argument("--budget-minutes", type=float, help="skip the settings that would end after this")
    args = parser.parse_args()
    start = time.perf_counter()
    run(args.quick, budget_minutes=args.budget_minutes)
    print(f"{time.perf_counter() - start:.1f} s")
