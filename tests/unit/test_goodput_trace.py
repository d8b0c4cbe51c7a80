"""bench/goodput_trace.py: the trace is the same for a seed and printable, and the accounting adds up by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(30)


def load():
    spec = importlib.util.spec_from_file_location("goodput_trace", ROOT / "bench/goodput_trace.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["goodput_trace"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_a_seed_gives_one_trace_that_alternates_loss_and_return_and_ends_in_time():
    g = load()
    trace = g.make_trace(seed=3, duration_s=600, hour_s=60)
    assert trace == g.make_trace(seed=3, duration_s=600, hour_s=60)
    assert trace != g.make_trace(seed=4, duration_s=600, hour_s=60)
    kinds = [e.kind for e in trace]
    assert len(trace) >= 3 and kinds[0] in ("preempt", "fail")
    assert all((a == "return") != (b == "return") for a, b in zip(kinds, kinds[1:], strict=False))
    assert all(e.notice == g.NOTICE_S for e in trace if e.kind == "preempt")
    assert all(a.lost_at <= b.at for a, b in zip(trace, trace[1:], strict=False))  # a deadline passes first
    assert trace[-1].lost_at < 600 - g.END_S
    text = g.describe(trace)
    assert text.count("\n") == len(trace) - 1 and ("30 s notice" in text or "no notice" in text)


def test_durations_follow_the_measured_traces_median_and_mean():
    """The lognormal draws reproduce the (median, mean) taken from the spot trace, within sampling error."""
    import random
    import statistics

    g = load()
    rng = random.Random(0)
    for median, mean in (g.UP_H, g.DOWN_H):
        draws = [g.lognormal_hours(rng, (median, mean)) for _ in range(40000)]
        assert abs(statistics.median(draws) / median - 1) < 0.03
        assert abs(statistics.fmean(draws) / mean - 1) < 0.08  # heavy-tailed: the mean converges slowly


def test_the_quick_trace_has_one_of_each():
    g = load()
    assert [e.kind for e in g.make_trace(0, 180, quick=True)] == ["preempt", "return", "fail", "return"]


def test_accounting_by_hand():
    g = load()
    # Steps 0-2 at one per second; a restart at t=3.5 comes back at 5.0 from a checkpoint of step 1, so
    # steps 1 and 2 are replayed (5-7), then step 3 (7-8); the window ends at 9.
    steps = [g.Step(0, 0, 1, 4, 3.0), g.Step(1, 1, 2, 4, 2.9), g.Step(2, 2, 3, 4, 2.8),
             g.Step(1, 5, 6, 2, 2.9), g.Step(2, 6, 7, 2, 2.8), g.Step(3, 7, 8, 2, 2.7)]
    out = g.account(steps, restarts=[4.0], window_s=9.0, batch=8)
    assert out["productive_s"] == pytest.approx(4.0)  # steps 0, 1, 2 first time, and step 3
    assert out["replaying_s"] == pytest.approx(2.0)
    assert out["restarting_s"] == pytest.approx(2.0)  # 3 -> 5 holds the restart
    assert out["stalled_s"] == pytest.approx(1.0)  # 8 -> 9, nothing running
    assert out["ettr"] == pytest.approx(4 / 9) and out["goodput"] == pytest.approx(4 * 8 / 9)
    assert out["steps"] == 4 and out["replayed"] == 2
    back = g.back_after(steps, [g.TraceEvent(3.2, "fail"), g.TraceEvent(6.5, "return")])
    assert back[0] == pytest.approx(6 - 3.2)  # the first step begun after the loss ends at 6
    assert back[1] is None  # no step on more workers came
