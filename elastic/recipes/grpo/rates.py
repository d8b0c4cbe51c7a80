"""Flip rates per prompt group: which group a prompt belongs to, its rates, and their estimation.

A verifier is rarely equally reliable everywhere: a rule-based checker may be exact on integers and
brittle on fractions, an LLM judge lenient on one task type. ``docs/grpo_noise.md`` shows why this
is where a noise correction can matter: with one constant Youden's J = 1 - rho_plus - rho_minus
the noisy group-centred advantage is already an unbiased estimate of J times the clean one, and
AdamW removes a constant J; with rates that differ between groups the noisy gradient under-weights
the noisier groups by J_g, which no global normalisation undoes.

- ``RateTable``: group name -> ``FlipRates``; ``rows(groups)`` gives the per-row rates that
  ``advantage.noise_corrected_advantages`` and ``noise.RewardNoise`` take.
- ``estimate_rates``: per-group rates from gold labels and observed (verifier or channel) labels,
  with Wilson 95% intervals, refusing a group with too few labelled samples of a class or with
  J <= 0 (its verifier carries no signal, so no correction can help).

A group comes from a dataset column (``grpo.rate_group = "task"``) or a function
``pkg.mod:fn(row) -> str``; prompts without a group share the group ``""``. Pure Python and torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from elastic.recipes.grpo.noise import FlipRates

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class RowRates:
    """Flip rates per row (a prompt or a completion): tensors [N] of rho_plus and rho_minus."""

    rho_plus: torch.Tensor
    rho_minus: torch.Tensor

    @property
    def scale(self) -> torch.Tensor:
        """J = 1 - rho_plus - rho_minus per row."""
        return 1.0 - self.rho_plus - self.rho_minus

    @property
    def constant(self) -> bool:
        return bool((self.rho_plus == self.rho_plus[0]).all() and (self.rho_minus == self.rho_minus[0]).all())

    @staticmethod
    def of(rates: FlipRates | RowRates, n: int) -> RowRates:
        """``rates`` as [n] rows; constant rates are repeated."""
        if isinstance(rates, RowRates):
            if rates.rho_plus.numel() != n:
                raise ValueError(f"got rates for {rates.rho_plus.numel()} rows, expected {n}")
            return rates
        full = torch.full((n,), 1.0, dtype=torch.float64)
        return RowRates(full * rates.rho_plus, full * rates.rho_minus)

    def repeat(self, times: int) -> RowRates:
        """Each row's rates ``times`` times in a row (a prompt's rates for its G completions)."""
        return RowRates(self.rho_plus.repeat_interleave(times), self.rho_minus.repeat_interleave(times))


@dataclass(frozen=True)
class RateTable:
    """Flip rates by group name; a group not in the table takes ``default`` (None: it is an error)."""

    groups: dict[str, FlipRates]
    default: FlipRates | None = None

    @staticmethod
    def parse(spec: str, default: FlipRates | None = None) -> RateTable:
        """``"arithmetic=0.05:0.05,sort_digits=0.3:0.3"`` (group=rho_plus:rho_minus, comma-separated)."""
        groups = {}
        for item in [s.strip() for s in spec.split(",") if s.strip()]:
            name, sep, pair = item.partition("=")
            plus, sep2, minus = pair.partition(":")
            try:
                if not sep or not sep2 or not name.strip():
                    raise ValueError
                groups[name.strip()] = FlipRates(float(plus), float(minus))
            except ValueError as err:
                detail = f" ({err})" if str(err) else ""
                raise ValueError(f"grpo.group_rates entry {item!r} is not 'group=rho_plus:rho_minus' with rates in "
                                 f"[0, 1) summing below 1{detail}; e.g. 'arithmetic=0.05:0.05'") from None
        return RateTable(groups, default)

    def of(self, group: str) -> FlipRates:
        if group in self.groups:
            return self.groups[group]
        if self.default is None:
            raise ValueError(f"prompt group {group!r} has no flip rates: the rates know the groups "
                             f"{sorted(self.groups)}; add it to grpo.group_rates, or to the calibration set")
        return self.default

    def rows(self, groups: Sequence[str]) -> RowRates:
        rates = [self.of(g) for g in groups]
        return RowRates(torch.tensor([r.rho_plus for r in rates], dtype=torch.float64),
                        torch.tensor([r.rho_minus for r in rates], dtype=torch.float64))

    @property
    def constant(self) -> bool:
        """One set of rates for every group (then a correction cannot re-weight groups against each other)."""
        return len({*self.groups.values(), *([self.default] if self.default else [])}) <= 1

    def used_by(self, groups: Iterable[str]) -> RateTable:
        """The table restricted to the rates that prompts of ``groups`` use: a group named in the table but
        with no prompt, or a default that every prompt's group overrides, cannot re-weight anything, so
        ``constant`` must not count it (the no-op warning reads this)."""
        present = set(groups)
        named = {g: r for g, r in self.groups.items() if g in present}
        unnamed = any(g not in self.groups for g in present)
        return RateTable(named, self.default if unnamed else None)


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (good at small n and near 0 or 1)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class GroupEstimate:
    """One group's estimated rates, its counts and its 95% intervals."""

    group: str
    rates: FlipRates
    negatives: int
    positives: int
    rho_plus_ci: tuple[float, float]
    rho_minus_ci: tuple[float, float]

    def line(self) -> str:
        name = self.group or "(all)"
        return (f"{name:>14}  rho+ {self.rates.rho_plus:.3f} [{self.rho_plus_ci[0]:.3f}, {self.rho_plus_ci[1]:.3f}] "
                f"of {self.negatives:>5} negatives   rho- {self.rates.rho_minus:.3f} [{self.rho_minus_ci[0]:.3f}, "
                f"{self.rho_minus_ci[1]:.3f}] of {self.positives:>5} positives   J {self.rates.scale:.3f}")


def estimate_rates(gold: torch.Tensor, observed: torch.Tensor, groups: Sequence[str],
                   min_per_class: int = 20) -> tuple[RateTable, list[GroupEstimate]]:
    """Per-group rates from a gold-labelled calibration set (see the module docstring).

    rho_plus^ = #(observed 1, gold 0) / #(gold 0) and rho_minus^ = #(observed 0, gold 1) / #(gold 1) in
    each group. One ValueError names the group, its count and the fix when a class has fewer than
    ``min_per_class`` samples, or when the estimate has J <= 0.
    """
    gold, observed = gold.reshape(-1), observed.reshape(-1)
    if not gold.numel() == observed.numel() == len(groups):
        raise ValueError(f"calibration set: {gold.numel()} gold labels, {observed.numel()} observed labels and "
                         f"{len(groups)} groups; pass one of each per sample")
    for what, values in (("gold label", gold), ("observed label", observed)):
        bad = ~((values == 0) | (values == 1))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"calibration sample {i}: {what} {float(values[i])!r} is not 0 or 1; the flip-rate "
                             "model applies to binary (verifiable) rewards only")
    table, estimates = {}, []
    for name in sorted(set(groups)):
        rows = torch.tensor([g == name for g in groups])
        g, o = gold[rows], observed[rows]
        negatives, positives = int((g == 0).sum()), int((g == 1).sum())
        for count, label, rate in ((negatives, 0, "rho_plus"), (positives, 1, "rho_minus")):
            if count < min_per_class:
                raise ValueError(
                    f"rate group {name or '(all)'!r} has {count} calibration samples with gold label {label}, fewer "
                    f"than the {min_per_class} needed to estimate {rate}; add labelled samples of that group (raise "
                    "grpo.calibration_size, or extend grpo.calibration), or merge it into another group")
        false_pos = int(((o == 1) & (g == 0)).sum())
        false_neg = int(((o == 0) & (g == 1)).sum())
        rho_plus, rho_minus = false_pos / negatives, false_neg / positives
        if rho_plus + rho_minus >= 1.0:
            raise ValueError(
                f"rate group {name or '(all)'!r}: estimated rho_plus + rho_minus = {rho_plus:.3f} + {rho_minus:.3f} "
                f">= 1 from {negatives} negatives and {positives} positives, so J = {1 - rho_plus - rho_minus:.3f} "
                "<= 0: the verifier carries no signal on this group and no correction can help; fix the verifier "
                "for this group, or drop the group's prompts")
        estimates.append(GroupEstimate(name, FlipRates(rho_plus, rho_minus), negatives, positives,
                                       wilson(false_pos, negatives), wilson(false_neg, positives)))
        table[name] = estimates[-1].rates
    return RateTable(table), estimates
