"""The driver's deadlines and hang verdicts: pure decisions over what the probes saw (no processes)."""

from __future__ import annotations

from elastic.driver.deadlines import Deadlines, Look, verdict


def test_a_window_is_the_floor_until_measured_then_a_multiple_of_the_slowest_recent_call():
    d = Deadlines(factor=4.0, floor_s=10.0, keep=3)
    assert d.window("step") == 10.0 and d.window("step", predicted=5.0) == 20.0
    for seconds in (1.0, 30.0, 2.0):
        d.observe("step", seconds)
    assert d.window("step") == 120.0  # 4 x the slowest of the last three
    for seconds in (1.0, 1.0, 1.0):  # the slow one leaves the memory
        d.observe("step", seconds)
    assert d.window("step") == 10.0 and d.window("rollout") == 10.0


def look(cpu: float, at: float, collective: bool = False, tasks: int = 1) -> Look:
    return Look(collective, cpu, tasks, at)


def test_a_worker_that_does_not_answer_the_probe_is_hung():
    assert list(verdict({1: look(1.0, 5.0), 2: None}, {}, finished=False)) == [2]


def test_an_idle_worker_is_hung_only_when_its_peers_wait_on_it_or_finished():
    before = {1: look(1.0, 0.0), 2: look(1.0, 0.0, collective=True)}
    now = {1: look(1.02, 100.0), 2: look(1.0, 100.0, collective=True)}  # 1 burnt 0.02 s of CPU in 100 s
    assert list(verdict(now, before, finished=False)) == [1]  # 2 waits in a collective: 1 is the culprit
    alone = {1: look(1.02, 100.0)}
    assert list(verdict(alone, {1: before[1]}, finished=True)) == [1]  # its peers finished without it
    assert verdict(alone, {1: before[1]}, finished=False) == {}  # nobody waits on it: a slow call, not a hang


def test_a_computing_worker_a_new_call_and_a_first_look_are_never_hung():
    before = {1: look(1.0, 0.0), 2: look(1.0, 0.0, collective=True)}
    busy = {1: look(60.0, 100.0), 2: look(1.0, 100.0, collective=True)}  # slow, but it computes
    assert verdict(busy, before, finished=True) == {}
    moved_on = {1: look(1.0, 100.0, tasks=2), 2: look(1.0, 100.0, collective=True)}
    assert verdict(moved_on, before, finished=True) == {}
    assert verdict({1: look(1.0, 100.0)}, {}, finished=True) == {}  # two looks are needed to call it idle


def test_workers_waiting_on_peers_are_victims_not_culprits():
    before = {1: look(1.0, 0.0, collective=True), 2: look(1.0, 0.0, collective=True)}
    now = {1: look(1.0, 100.0, collective=True), 2: look(1.0, 100.0, collective=True)}
    assert verdict(now, before, finished=True) == {}
