"""The bandit's tables, its planned contrasts with a Holm correction, and the decision rule (``noise_bandit.py``).

Per setting: each arm's chosen lr (with kappa or beta'), whether that lr sat at the grid's edge, its mean on
the tuning seeds, and on the report seeds its mean with a 95% t-interval and its paired difference from the
best-lr noisy arm (unadjusted 95% t-interval). The planned contrasts, over all settings in one Holm family:
each correction (dr_grpo with true rates, dr_grpo with estimated rates, posterior) minus the best-lr noisy arm,
minus the best task weight J_g^kappa (kappa in {-1/2, 0, 1/2, 1} with its own lr: the correction itself,
kappa = -1, is not its own competitor), and with beta > 0 minus noisy at the best beta'. The decision rule:
a correction is supported in a setting only when its Holm-adjusted intervals against both the best-lr noisy
arm and the best task weight lie above 0.
"""

from __future__ import annotations

from noise_stats import Contrast, holm

CORRECTIONS = ("dr_grpo", "dr_grpo est", "posterior")


def _mean_ci(values) -> str:
    c = Contrast("", [float(v) for v in values])
    lo, hi = c.interval(0.05)
    return f"{c.mean:.4f} ±{(hi - lo) / 2:.4f}"


def _diff(tuned, a: str, b: str) -> Contrast:
    return Contrast(f"{a} - {b}", [float(x) for x in tuned.final[a] - tuned.final[b]])


def _fmt(c: Contrast, alpha: float | None = None) -> str:
    lo, hi = c.adjusted if alpha is None else c.interval(alpha)
    return f"{c.mean:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def setting_table(tuned, n_tune: int, n_report: int, steps: int) -> str:
    s = tuned.setting
    grid = ", ".join(f"{lr:g}" for lr in tuned.grid)
    inside = "inside" if tuned.clean_inside else "NOT INSIDE (still at the edge after moving the grid)"
    lines = [f"== {s.name}: {n_tune} tuning seeds, {n_report} report seeds, {steps} steps ==",
             f"lr grid [{grid}]; clean arm's best lr {inside}",
             f"{'arm':<16}{'chosen':<22}{'edge':<6}{'tuning':>8}   {'report [95% t]':<18}  Δ vs best-lr noisy [95% t]"]
    for arm in tuned.chosen:
        what = f"lr {arm.lr:g}"
        if arm.name.startswith("best "):
            what += f" = {arm.family}"
        row = (f"{arm.name:<16}{what:<22}{'EDGE' if tuned.edge[arm.name] else '':<6}{tuned.tuning[arm.name]:>8.4f}   "
               f"{_mean_ci(tuned.final[arm.name]):<18}  ")
        if arm.name != "noisy":
            row += _fmt(_diff(tuned, arm.name, "noisy"), 0.05)
            row += "  (noise cost, negated)" if arm.name == "clean" else ""
        lines.append(row.rstrip())
    return "\n".join(lines)


def planned(tuned) -> list[tuple[str, str, Contrast]]:
    """(setting, correction, contrast) of one setting's planned contrasts."""
    out = []
    refs = ["noisy", "best kappa"] + (["best beta'"] if "best beta'" in tuned.final else [])
    for corr in CORRECTIONS:
        for ref in refs:
            out.append((tuned.setting.name, corr, _diff(tuned, corr, ref)))
    return out


def report_all(tuned_list: list) -> str:
    contrasts = [c for t in tuned_list for c in planned(t)]
    holm([c for _, _, c in contrasts])
    m = len(contrasts)
    lines = [f"== Planned contrasts: {m}, one Holm family (alpha 0.05); paired differences on the report seeds ==",
             f"{'setting':<46}{'contrast':<30}{'mean [Holm-adjusted t-interval]':<36}{'p':>9}  level"]
    for name, _, c in contrasts:
        lines.append(f"{name:<46}{c.name:<30}{_fmt(c):<36}{c.p:>9.2g}  {c.level:.4g}")
    lines += ["", "Decision rule: a correction is supported in a setting only if it beats BOTH the best-lr noisy arm",
              "and the best task weight J_g^kappa (kappa in {-1/2, 0, 1/2, 1}), each with a Holm-adjusted interval",
              "excluding 0. (Against noisy at the best beta' it is reported, not required.)"]
    verdicts = {}
    for corr in CORRECTIONS:
        wins, losses = [], []
        for t in tuned_list:
            mine = {c.name.split(" - ")[1]: c for s, k, c in contrasts if s == t.setting.name and k == corr}
            if mine["noisy"].excludes_zero_above and mine["best kappa"].excludes_zero_above:
                wins.append(t.setting.name)
            if any(c.adjusted[1] < 0 for c in mine.values()):
                losses.append(t.setting.name)
        verdicts[corr] = wins
        lines.append(f"  {corr:<12} supported in {len(wins)} of {len(tuned_list)} settings"
                     + (f": {'; '.join(wins)}" if wins else "")
                     + f"; significantly worse than a reference in {len(losses)}"
                     + (f" ({'; '.join(losses)})" if losses else ""))
    supported = [c for c, w in verdicts.items() if w]
    lines.append("VERDICT: " + ("correction supported where listed above: " + ", ".join(supported) if supported else
                                "no correction is supported: none beats both the best-lr noisy arm and the best "
                                "task weight with a Holm-adjusted interval excluding 0"))
    return "\n".join(lines)
