"""Invariant 4: a worker killed during a step makes that step fail, naming the worker (how fast: bench/failures.py)."""

from __future__ import annotations

import threading

import pytest

from elastic.core.layout import Layout, Placement
from elastic.driver.ray_group import WorkerFailure
from tests.helpers import tiny_config


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout_text", ["fsdp=2,tp=2", "dp=2,pp=2,mb=2"])
def test_killed_worker_fails_the_step_in_flight(fresh_pool, layout_text):
    pool = fresh_pool
    pool.cfg = tiny_config(dtype="float32", steps=10_000, global_batch=16, seq_len=32)
    placement = Placement(Layout.parse(layout_text), tuple(pool.warm()[:4]))
    pool.setup(placement)
    pool.step()
    victim = placement.workers[1]
    killed = threading.Event()

    def kill():
        pool.kill(victim)
        killed.set()

    threading.Timer(0.3, kill).start()  # lands during some step
    completed_after_the_kill = 0
    with pytest.raises(WorkerFailure) as failure:
        for _ in range(1000):
            after = killed.is_set()  # the SIGKILL was sent before this step began
            pool.step()
            completed_after_the_kill += after
    # The step in flight (or, at the latest, the next one) fails: no step begun after the kill completes, and
    # none waits out a collective timeout (the test's own timeout would end it). How soon: bench/failures.py.
    assert killed.is_set() and completed_after_the_kill == 0
    assert victim in failure.value.dead and f"worker {victim}" in str(failure.value)
    # Survivors were released (no hang) and still answer.
    survivors = [w for w in placement.workers if w != victim]
    assert sorted(pool.ping(survivors)) == sorted(survivors)


class Explode:
    """A worker task that fails the way a bug would."""

    def run(self, ctx):
        raise ValueError(f"boom on worker {ctx.worker}")


@pytest.mark.timeout(60)
def test_a_failing_task_reports_one_line_and_keeps_the_remote_traceback(pool):
    pool.cfg = tiny_config(dtype="float32")
    placement = Placement(Layout(dp=2), tuple(pool.warm()[:2]))
    pool.setup(placement)
    with pytest.raises(WorkerFailure) as failure:
        pool.run({placement.workers[0]: Explode()})
    line, detail = str(failure.value), failure.value.traceback_text()
    assert "ValueError: boom on worker" in line and "\n" not in line and "Traceback" not in line
    assert "Traceback (most recent call last)" in detail and "in run" in detail and "boom on worker" in detail
    assert sorted(pool.ping(placement.workers)) == sorted(placement.workers)  # nobody died
