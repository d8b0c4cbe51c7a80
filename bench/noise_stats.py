"""Paired t-intervals with a Holm correction, for the noisy-reward GRPO benches (pure Python math).

A contrast is the per-seed difference of two arms run on the same seeds and the same random draws. Its
two-sided p-value comes from Student's t with n - 1 degrees of freedom (the regularised incomplete beta
function, by Lentz's continued fraction, so the benches need no scipy). Holm's step-down method controls
the family-wise error over the planned contrasts: sorted by p, the i-th smallest (0-based) of m is tested
at alpha / (m - i), and once one fails every larger p fails too. Each contrast's adjusted interval is its
t-interval at the level its Holm step used (at least the level of the last rejection), the usual
interval companion of Holm's test; an adjusted interval excludes 0 exactly when Holm rejects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if not math.isfinite(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: int) -> float:
    """The upper ``q`` quantile's magnitude: the c with P(|T| >= c) = 2 (1 - q), by bisection."""
    target, lo, hi = 2.0 * (1.0 - q), 0.0, 1e3
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > target else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass
class Contrast:
    """One planned paired contrast: the per-seed differences and their t statistics."""

    name: str
    diffs: Sequence[float]
    p: float = 1.0
    level: float = 0.05  # the two-sided alpha of its Holm step (filled in by ``holm``)

    def __post_init__(self) -> None:
        n = len(self.diffs)
        self.mean = sum(self.diffs) / n
        var = sum((d - self.mean) ** 2 for d in self.diffs) / (n - 1)
        self.se = math.sqrt(var / n)
        self.df = n - 1
        self.p = 1.0 if self.se == 0 else t_two_sided_p(self.mean / self.se, self.df)
        if self.se == 0 and self.mean != 0:
            self.p = 0.0

    def interval(self, alpha: float) -> tuple[float, float]:
        half = t_quantile(1 - alpha / 2, self.df) * self.se
        return self.mean - half, self.mean + half

    @property
    def adjusted(self) -> tuple[float, float]:
        return self.interval(self.level)

    @property
    def excludes_zero_above(self) -> bool:
        return self.adjusted[0] > 0


def holm(contrasts: list[Contrast], alpha: float = 0.05) -> None:
    """Set each contrast's Holm level (see the module docstring)."""
    m = len(contrasts)
    rejecting = True
    last = alpha / m
    for i, c in enumerate(sorted(contrasts, key=lambda c: c.p)):
        step = alpha / (m - i)
        if rejecting and c.p <= step:
            last = step
            c.level = step
        else:
            rejecting = False
            c.level = last  # at or below the level of the last rejection: its interval keeps 0 when Holm does
