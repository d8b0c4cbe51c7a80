"""Noisy-reward GRPO on a softmax bandit: does a noise correction change what the optimiser does?

What: 64 prompts x 16 answers, one correct answer per prompt (seeded). Each step every prompt samples
G = 8 answers from its softmax policy, the true 0/1 reward r* is flipped into the observed r~ with its
prompt's rates (rho_plus, rho_minus), advantages come from the package's
``noise_corrected_advantages`` with the arm's correction, and one AdamW (weight_decay 0) or SGD step
is taken on loss = -(A * log pi(a)).sum() / (P * G) (on-policy single step: no ratio, no clipping, no KL).
Reported: the true expected reward mean_p pi_p(correct) after the last step, per arm, and paired
differences between arms with 95% intervals (mean +- 1.96 SE over seeds).

How: seeds are vectorised (parameters [seeds, ...]; AdamW and SGD are elementwise, so every seed is
its own run). Common random numbers: the uniforms for sampling (inverse CDF) and for flipping come
from a generator keyed by (seed, step), so all arms of a setting (and all settings) see the same
uniforms; differences between arms are paired. All arms start from zero logits. Learning rates were
tuned once on the clean arm (clean ends at 0.6-0.75: clear progress, not saturated after 200 steps).
Arms: clean, noisy, dr_grpo and noisy at lr / mean J (the matched-LR control), the same two at AdamW
eps 1e-12 (to tell an eps effect from a real one), forward; and the std-normalised family (scale
"group"): clean std, noisy std, noisy std at lr / mean J, grpo with and without its std floor.

Parameterisations: "tabular" logits theta [64, 16] (the brief's bandit), and "shared" logits
X_p @ W (fixed seeded features X [64, 8], learnt W [8, 16], the correct answer argmax X_p @ W*).
Why both: in the tabular bandit each prompt owns its parameters, so a per-group gradient scale 1/J_g
is a constant per-element scale, which AdamW removes just like a global one; dr_grpo is then a no-op
under AdamW even with two rate groups. Only shared parameters let the re-weighting of groups matter.

Assumes: rates known exactly (no estimation error), binary rewards, beta = 0. Predictions for dr_grpo
(tests/unit/test_grpo_noise.py): AdamW with constant rates (or tabular parameters): no-op up to eps,
PASS if the interval of (dr_grpo - noisy) contains 0, or if the gap shrinks >= 100x at eps 1e-12; SGD
with constant rates: the same run as noisy at lr/J, PASS if (dr_grpo - noisy lr/J) contains 0 (up to
1e-12 of float rounding). Elsewhere, and for the grpo and forward corrections (not a constant rescale),
"can matter": we print whether the arm beats its uncorrected reference with an interval excluding 0,
and the fraction of the noise cost it recovers.
Usage: python bench/noise_bandit.py [--quick]   (quick: 30 seeds; full: 200 seeds; 200 steps each)
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch

from elastic.core.seeds import stable_seed
from elastic.recipes.grpo.advantage import noise_corrected_advantages
from elastic.recipes.grpo.rates import RowRates

F64 = torch.float64
PROMPTS, ANSWERS, G, FEATURES = 64, 16, 8, 8
Z95 = 1.959963984540054
ROUNDING = 1e-12  # differences this small are float rounding (SGD: lr * A / J vs (lr / J) * A)
# Tuned once on the clean arm (dr_grpo-style "none" scaling) for 200 steps; see the module docstring.
LR = {("tabular", "adamw"): 0.01, ("tabular", "sgd"): 8.0, ("shared", "adamw"): 0.01, ("shared", "sgd"): 1.0}
# Noise settings: (rho_plus, rho_minus) of the first and of the second half of the prompts.
NOISES = {
    "sym 0.2": ((0.2, 0.2), (0.2, 0.2)),
    "sym 0.3": ((0.3, 0.3), (0.3, 0.3)),
    "asym 0.4/0.2": ((0.4, 0.2), (0.4, 0.2)),
    "two groups": ((0.05, 0.05), (0.3, 0.3)),
    "false neg 0.4": ((0.0, 0.4), (0.0, 0.4)),  # rho_plus = 0: the case the forward correction assumes
}


@dataclass(frozen=True)
class Arm:
    name: str
    noisy: bool
    correction: str
    scale: str  # scale_rewards
    lr_over_j: bool = False  # the matched-LR control: lr / (mean J over prompts)
    std_floor: float | None = None  # grpo only; None: the package's default floor
    adam_eps: float = 1e-8  # torch's default; 1e-12 shows whether an AdamW gap is an eps effect (AdamW only)


ARMS = (
    Arm("clean", False, "none", "none"),
    Arm("noisy", True, "none", "none"),
    Arm("dr_grpo", True, "dr_grpo", "none"),
    Arm("noisy lr/J", True, "none", "none", lr_over_j=True),
    Arm("noisy eps-12", True, "none", "none", adam_eps=1e-12),
    Arm("dr_grpo eps-12", True, "dr_grpo", "none", adam_eps=1e-12),
    Arm("forward", True, "forward", "none"),
    Arm("clean std", False, "none", "group"),
    Arm("noisy std", True, "none", "group"),
    Arm("noisy std lr/J", True, "none", "group", lr_over_j=True),
    Arm("grpo", True, "grpo", "group"),
    Arm("grpo no floor", True, "grpo", "group", std_floor=0.0),
)
# Corrected arm -> (uncorrected, clean, matched-LR reference), all with the arm's scale_rewards.
REFERENCES = {"dr_grpo": ("noisy", "clean", "noisy lr/J"), "dr_grpo eps-12": ("noisy eps-12", "clean", None),
              "forward": ("noisy", "clean", None), "grpo": ("noisy std", "clean std", "noisy std lr/J"),
              "grpo no floor": ("noisy std", "clean std", "noisy std lr/J")}


@dataclass(frozen=True)
class Setting:
    optimizer: str  # "adamw" | "sgd"
    noise: str  # a key of NOISES
    params: str = "tabular"  # "tabular" | "shared"

    def rates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """rho_plus [P] and rho_minus [P]: the first half of the prompts in group 0, the rest in group 1."""
        half = PROMPTS // 2
        (p0, m0), (p1, m1) = NOISES[self.noise]
        return (torch.tensor([p0] * half + [p1] * half, dtype=F64), torch.tensor([m0] * half + [m1] * half, dtype=F64))

    @property
    def constant(self) -> bool:
        return NOISES[self.noise][0] == NOISES[self.noise][1]

    def prediction(self, arm: str) -> str:
        """What the theory says of dr_grpo here; the other corrections are not a constant rescale."""
        if not arm.startswith("dr_grpo"):
            return "can matter"
        if self.optimizer == "adamw" and (self.constant or self.params == "tabular"):
            return "no-op"
        return "= lr/J" if self.constant else "can matter"

    def arms(self) -> tuple[Arm, ...]:
        return tuple(a for a in ARMS if a.adam_eps == 1e-8 or self.optimizer == "adamw")


def problem(seeds: list[int], params: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Correct answers [S, P] and, for shared parameters, the features X [S, P, FEATURES] (per seed)."""
    correct, features = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(stable_seed(seed, "noise-bandit", "problem"))
        if params == "tabular":
            correct.append(torch.randint(ANSWERS, (PROMPTS,), generator=gen))
        else:
            x = torch.randn(PROMPTS, FEATURES, generator=gen, dtype=F64)
            correct.append((x @ torch.randn(FEATURES, ANSWERS, generator=gen, dtype=F64)).argmax(-1))
            features.append(x)
    return torch.stack(correct), (torch.stack(features) if features else None)


def uniforms(seeds: list[int], step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling and flipping uniforms [S, P, G], keyed by (seed, step) only: common to every arm."""
    draws = [torch.rand(2, PROMPTS, G, generator=torch.Generator().manual_seed(
        stable_seed(seed, "noise-bandit", step)), dtype=F64) for seed in seeds]
    both = torch.stack(draws, dim=1)
    return both[0], both[1]


def simulate(setting: Setting, seeds: list[int], steps: int) -> dict[str, torch.Tensor]:
    """Train every arm on the same draws; the final true expected reward per arm, [S]."""
    correct, features = problem(seeds, setting.params)
    rho_plus, rho_minus = setting.rates()
    rows = RowRates(rho_plus.repeat(len(seeds)), rho_minus.repeat(len(seeds)))  # seed-major, like the rewards
    mean_j = float((1 - rho_plus - rho_minus).mean())
    shape = (len(seeds), PROMPTS, ANSWERS) if features is None else (len(seeds), FEATURES, ANSWERS)
    weights = {a.name: torch.zeros(shape, dtype=F64, requires_grad=True) for a in setting.arms()}

    def logits(w: torch.Tensor) -> torch.Tensor:
        return w if features is None else features @ w

    lr = LR[(setting.params, setting.optimizer)]
    groups = [{"params": [weights[a.name]], "lr": lr / mean_j if a.lr_over_j else lr, "eps": a.adam_eps}
              for a in setting.arms()]
    opt = torch.optim.AdamW(groups, weight_decay=0.0) if setting.optimizer == "adamw" else \
        torch.optim.SGD([{k: v for k, v in g.items() if k != "eps"} for g in groups])
    for step in range(steps):
        u_sample, u_flip = uniforms(seeds, step)
        loss = torch.zeros((), dtype=F64)
        for arm in setting.arms():
            logp = torch.log_softmax(logits(weights[arm.name]), dim=-1)
            cdf = logp.detach().exp().cumsum(-1)
            answers = torch.searchsorted(cdf, u_sample).clamp(max=ANSWERS - 1)  # inverse CDF: paired samples
            true = (answers == correct[..., None]).to(F64)
            reward = true
            if arm.noisy:
                flip = torch.where(true == 1, u_flip < rho_minus[:, None], u_flip < rho_plus[:, None])
                reward = torch.where(flip, 1 - true, true)
            adv = noise_corrected_advantages(reward.reshape(-1), G, rows, arm.correction, arm.scale,
                                             std_floor=arm.std_floor).view_as(reward)
            loss = loss - (adv * logp.gather(-1, answers)).sum() / (PROMPTS * G)  # summed over seeds
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return {name: torch.softmax(logits(w), -1).gather(-1, correct[..., None]).squeeze(-1).mean(-1)
                for name, w in weights.items()}


def interval(diff: torch.Tensor) -> tuple[float, float, float]:
    """Mean and its 95% interval over seeds."""
    mean, half = float(diff.mean()), Z95 * float(diff.std()) / math.sqrt(diff.numel())
    return mean, mean - half, mean + half


def has_zero(ci: tuple[float, float, float]) -> bool:
    return ci[1] - ROUNDING <= 0.0 <= ci[2] + ROUNDING


def fmt(ci: tuple[float, float, float]) -> str:
    spec = "+.1e" if max(map(abs, ci)) < 5e-4 else "+.4f"  # tiny gaps (eps, rounding) in exponent notation
    return f"{ci[0]:{spec}} [{ci[1]:{spec}}, {ci[2]:{spec}}]"


def verdict(setting: Setting, arm: str, final: dict[str, torch.Tensor]) -> tuple[str, str, str]:
    """(recovered fraction, prediction, computed verdict) of a corrected arm."""
    noisy, clean, matched = REFERENCES[arm]
    vs_noisy, cost = interval(final[arm] - final[noisy]), interval(final[clean] - final[noisy])
    resolved = cost[1] > 0  # the noise cost something, measurably
    recovered = f"{vs_noisy[0] / cost[0]:+.2f}" if resolved else "n/a"
    prediction = setting.prediction(arm)
    if prediction == "no-op":
        if arm == "dr_grpo eps-12":
            return recovered, prediction, "(eps diagnostic for the dr_grpo row)"
        if has_zero(vs_noisy):
            return recovered, prediction, "PASS (equal within the interval)"
        # The theory says "no-op up to AdamW's eps": check that, as the unit test does, by the gap shrinking
        # at a 10^4 times smaller eps (by >= 100x), rather than assuming it.
        small = interval(final["dr_grpo eps-12"] - final["noisy eps-12"])
        shrink = abs(vs_noisy[0]) / max(abs(small[0]), 1e-300)
        if shrink >= 100:
            return recovered, prediction, f"FAIL at eps 1e-8, PASS up to eps: gap {shrink:.0e}x smaller at eps 1e-12"
        return recovered, prediction, "FAIL: differs from uncorrected, not an eps effect"
    if prediction == "= lr/J":
        return recovered, prediction, "PASS (= noisy lr/J within the interval)" if \
            has_zero(interval(final[arm] - final[matched])) else "FAIL: differs from noisy lr/J"
    effect = "helps" if vs_noisy[1] > 0 else "HURTS" if vs_noisy[2] < 0 else "no resolved effect"
    if not resolved:
        return recovered, prediction, f"{effect}; noise cost not resolved"
    half = "recovers >= half" if vs_noisy[0] >= 0.5 * cost[0] else "recovers < half"
    return recovered, prediction, f"{effect}; {half}"


def table(setting: Setting, final: dict[str, torch.Tensor], seeds: int, steps: int) -> str:
    (p0, m0), (p1, m1) = NOISES[setting.noise]
    rates = (f"rho+ {p0}, rho- {m0}, J {1 - p0 - m0:.2f}" if setting.constant else
             f"half J {1 - p0 - m0:.2f} ({p0}, {m0}), half J {1 - p1 - m1:.2f} ({p1}, {m1}); lr/J uses the mean J")
    lr = LR[(setting.params, setting.optimizer)]
    mean_j = float((1 - sum(setting.rates())).mean())
    lines = [f"== {setting.optimizer.upper()}, {setting.params}, noise {setting.noise} ({rates}), lr {lr:g}, "
             f"{seeds} seeds x {steps} steps ==",
             f"{'arm':<16}{'lr':>7}  {'final true reward':<18}{'Δ vs uncorrected [95%]':<31}"
             f"{'Δ vs matched lr/J [95%]':<31}{'recov.':>7}  {'prediction':<11}verdict"]
    for arm in setting.arms():
        ci = interval(final[arm.name])
        row = f"{arm.name:<16}{lr / mean_j if arm.lr_over_j else lr:>7.3g}  {ci[0]:.4f} ±{ci[2] - ci[0]:.4f}    "
        if arm.name in ("clean", "clean std"):  # what the noise cost, in its scale_rewards family
            row += fmt(interval(final[arm.name] - final[f"noisy{arm.name[5:]}"])) + "  (noise cost)"
        elif arm.name in REFERENCES:
            recovered, prediction, text = verdict(setting, arm.name, final)
            ref = REFERENCES[arm.name][2]
            matched = fmt(interval(final[arm.name] - final[ref])) if ref else ""
            row += (f"{fmt(interval(final[arm.name] - final[REFERENCES[arm.name][0]])):<31}{matched:<31}"
                    f"{recovered:>7}  {prediction:<11}{text}")
        lines.append(row.rstrip())
    return "\n".join(lines)


def settings() -> list[Setting]:
    tabular = [Setting(opt, noise) for opt in ("adamw", "sgd") for noise in NOISES]
    # Shared parameters: where group re-weighting can survive AdamW, plus a constant-rate control.
    shared = [Setting(opt, noise, "shared") for opt in ("adamw", "sgd") for noise in ("sym 0.3", "two groups")]
    return tabular + shared


def run(quick: bool) -> str:
    """Every setting's table, printed and returned."""
    torch.set_num_threads(1)
    seeds, steps = (30, 200) if quick else (200, 200)
    out = []
    for setting in settings():
        out.append(table(setting, simulate(setting, list(range(seeds)), steps), seeds, steps))
        print(out[-1] + "\n", flush=True)
    legend = ("final true reward: mean ± 95% half-width over seeds. Δ: paired differences over seeds, mean [95% "
              "interval]; clean rows: clean - noisy (the noise cost). recov. = (corrected - noisy) / (clean - noisy), "
              "within the scale_rewards family.")
    print(legend)
    return "\n\n".join(out) + "\n\n" + legend


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="30 seeds instead of 200")
    start = time.perf_counter()
    run(parser.parse_args().quick)
    print(f"{time.perf_counter() - start:.1f} s")
