"""The preemption trace ``bench/goodput.py`` plays against every system, and the accounting of where time went.

**The trace.** Capacity is one permanent node (where the driver or the rendezvous lives) and one spot node,
two workers each. The spot node alternates between up and down. How long it stays up, and how long its
capacity stays away once lost, are drawn (seeded) from the durations in a public measured trace:
SkyPilot's spot-traces, released with *Can't Be Late: Optimizing Spot Instance Savings under Deadlines*
(Wu et al., NSDI '24), file set ``preemption/1-node/aws-04-22-2023``: one p3.2xlarge (V100) spot instance
in each of four AWS zones, polled every 32 s for 7 days. Over its 202 complete up-runs and 200 complete
down-runs (the first and last run of each zone dropped as cut off), an instance stayed up for a median
0.64 h (mean 2.03 h) and capacity stayed away for a median 0.40 h (mean 1.36 h); ``UP_H``/``DOWN_H`` keep
these, and durations are drawn from the lognormal with that median and mean (heavy-tailed like the data;
an exponential would put the median at 0.69x the mean, the data at 0.32x). The trace is **compressed**:
``hour_s`` seconds of the bench stand for one hour of the measured trace (default 60, so 60x).

What the measured trace does not say is whether a loss came with a notice; that follows the providers'
documentation (a GCP spot VM gets 30 s of notice, an AWS spot instance 2 minutes; we use GCP's, the
shorter, and do not compress it: it is what a system has to react in) and the bench's assumption for the
share of losses that come with none (``NOTICE_SHARE``: hardware failures and the like).

**The accounting** turns a system's step log into a timeline: each step is *productive* (the first time that
step was done) or *replaying* (redoing a step done before, after a restart from a checkpoint or snapshot);
the time between steps is *restarting* when a process restart happened in it (the peers' rank 0 says
``resumed``), else *stalled* (a reshard, a recovery, a rendezvous). ETTR is productive time over wall time;
goodput is the samples of distinct steps finished per second of wall time.

Pure Python: no torch, no Ray (``tests/unit/test_goodput_trace.py`` checks both halves).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

NOTICE_S = 30.0  # GCP spot preemption notice (AWS gives 120 s; the shorter one is the harder case)
NOTICE_SHARE = 0.5  # of the events that take the spot node away, how many come with a notice
# (median, mean) hours from spot-traces' preemption/1-node/aws-04-22-2023 (see above): up, and capacity away.
UP_H = (0.644, 2.035)
DOWN_H = (0.396, 1.359)
SOURCE = ("SkyPilot spot-traces (Wu et al., NSDI '24), AWS p3.2xlarge spot in 4 zones, 7 days: up a median "
          f"{UP_H[0]:.2f} h (mean {UP_H[1]:.2f} h), away a median {DOWN_H[0]:.2f} h (mean {DOWN_H[1]:.2f} h)")


def lognormal_hours(rng: random.Random, median_mean: tuple[float, float]) -> float:
    """A duration in hours from the lognormal with this (median, mean): mean = median * exp(sigma^2 / 2)."""
    median, mean = median_mean
    return rng.lognormvariate(math.log(median), math.sqrt(2 * math.log(mean / median)))


@dataclass(frozen=True)
class TraceEvent:
    at: float  # seconds after the system's first step
    kind: str  # "preempt" (notice at ``at``, node gone at ``at + notice``), "fail" (gone at ``at``), "return"
    notice: float = 0.0

    @property
    def lost_at(self) -> float:
        """When the node is gone (preempt: at the deadline)."""
        return self.at + self.notice


def make_trace(seed: int, duration_s: float, hour_s: float = 60.0, notice_s: float = NOTICE_S,
               quick: bool = False) -> list[TraceEvent]:
    """Events over ``duration_s`` seconds, ``hour_s`` of them per hour of the measured trace; ``quick``: exactly
    one preemption, one return, one failure (and the return after it), evenly spaced. The last event ends (its
    deadline included) at least ``END_S`` before the end, so its cost shows in the window."""
    if quick:
        gap = duration_s / 5
        return [TraceEvent(gap * 0.5, "preempt", notice_s), TraceEvent(gap * 1.8, "return"),
                TraceEvent(gap * 2.8, "fail"), TraceEvent(gap * 3.6, "return")]
    rng, t, up, events = random.Random(seed), 0.0, True, []
    while True:
        t += lognormal_hours(rng, UP_H if up else DOWN_H) * hour_s
        if up:
            notice = notice_s if rng.random() < NOTICE_SHARE else 0.0
            event = TraceEvent(round(t, 1), "preempt" if notice else "fail", notice)
        else:
            event = TraceEvent(round(t, 1), "return")
        if event.lost_at > duration_s - END_S:
            return events
        events.append(event)
        t, up = event.lost_at, not up


END_S = 30.0


def describe(trace: list[TraceEvent]) -> str:
    words = {"preempt": "preemption, {notice:.0f} s notice", "fail": "node failure, no notice",
             "return": "capacity returns"}
    return "\n".join(f"  t={e.at:7.1f} s  {words[e.kind].format(**asdict(e))}" for e in trace)


@dataclass(frozen=True)
class Step:
    step: int
    begin: float  # seconds after the first step began
    end: float
    world: int
    loss: float


def timeline(steps: list[Step], restarts: list[float], window_s: float) -> list[tuple[str, float, float]]:
    """(kind, start, end) segments covering [0, window_s]: productive, replaying, stalled, restarting."""
    segments, done, cursor = [], -1, 0.0
    for s in sorted(steps, key=lambda s: s.end):
        if s.begin >= window_s:
            break
        begin, end = max(s.begin, cursor), min(s.end, window_s)
        if begin > cursor:
            restarted = any(cursor <= r <= begin for r in restarts)
            segments.append(("restarting" if restarted else "stalled", cursor, begin))
        if end > begin:
            segments.append(("productive" if s.step > done else "replaying", begin, end))
        done, cursor = max(done, s.step), max(cursor, end)
    if cursor < window_s:
        segments.append(("stalled", cursor, window_s))
    return segments


def account(steps: list[Step], restarts: list[float], window_s: float, batch: int) -> dict:
    """ETTR, goodput and the rest for the steps finished inside [0, window_s]."""
    inside = [s for s in steps if s.end <= window_s]
    segments = timeline(steps, restarts, window_s)
    spent = {kind: sum(b - a for k, a, b in segments if k == kind)
             for kind in ("productive", "replaying", "stalled", "restarting")}
    distinct = len({s.step for s in inside})
    seen, replayed = set(), 0
    for s in sorted(inside, key=lambda s: s.end):
        replayed += s.step in seen
        seen.add(s.step)
    last = sorted(inside, key=lambda s: s.end)[-5:]
    return {"ettr": spent["productive"] / window_s, "goodput": distinct * batch / window_s,
            "steps": distinct, "replayed": replayed, "final_loss": sum(s.loss for s in last) / max(len(last), 1),
            **{f"{k}_s": v for k, v in spent.items()}}


def back_after(steps: list[Step], trace: list[TraceEvent]) -> list[float | None]:
    """Per event, seconds from the capacity change (a node gone; for a return, the node added) to the end of
    the first step begun after it (for a return: the first on more workers than the step before it)."""
    out = []
    ordered = sorted(steps, key=lambda s: s.begin)
    for event in trace:
        t = event.lost_at
        before = [s for s in ordered if s.begin < t]
        world = before[-1].world if before else 0
        after = [s for s in ordered if s.begin >= t and (s.world > world if event.kind == "return" else True)]
        out.append(after[0].end - t if after else None)
    return out
