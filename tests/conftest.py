"""Shared fixtures: one Ray instance per test session and a reusable pool of worker actors.

Starting Ray takes ~6 s and a worker ~5 s (importing torch), so tests share them. A test that
kills workers asks the pool to replace them (``fresh_pool``).

Ray reads its auth mode when it is first imported, so token auth is switched on here, before any
test imports ray: the session's local Ray and the `ray job submit` test's cluster both use it, in
whatever order the tests run.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import hypothesis
import pytest

from elastic.driver.connect import use_token_auth

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# One intra-op thread in this process and the processes it starts (the workers set theirs from
# runtime.threads_per_worker, 1 by default): on 2 cores shared with a dozen worker processes, torch's second
# thread spins instead of helping; the GRPO LoRA reference took 47.8 CPU-s for two steps on 2 threads and 7.6
# on one, at load ~30. Summation order may change; every comparison's tolerance is far above it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tokenised data files are cached per session, not in the user's ~/.cache (set before Ray starts: workers inherit it).
os.environ.setdefault("ELASTIC_CACHE_DIR", tempfile.mkdtemp(prefix="elastic-cache-"))
use_token_auth()

# No example may fail for taking long: hypothesis's default 200 ms deadline is a wall-clock assertion, and it
# failed test_layout's round trip on a loaded machine.
hypothesis.settings.register_profile("elastic", deadline=None)
hypothesis.settings.load_profile("elastic")

DEV_EXTRAS = ("transformers", "datasets", "peft", "trl", "hypothesis", "pytest_timeout")  # [dev] and runtime


def pytest_configure(config):
    """A missing dev extra fails the run at once, in one line, instead of skipping the tests that need it."""
    missing = [name for name in DEV_EXTRAS if importlib.util.find_spec(name) is None]
    if missing:
        pytest.exit(f"missing dev extras {missing}: install them with .venv/bin/pip install -e '.[dev]' "
                    "(or run make test, which does)", returncode=3)


def pytest_collection_finish(session):
    """Start the cluster scenarios and the job-submit head node the selected tests need
    (tests/integration/background.py) right away, so they start while the unit tier runs."""
    from tests.integration import background

    files = {Path(str(item.fspath)).name for item in session.items}
    background.start([name for name, test in background.SCENARIOS.items() if test in files])
    # The session's Ray too: its idle worker processes then import torch (PRELOAD) while the unit tier runs,
    # and the pool's workers land on them.
    if any("ray_session" in item.fixturenames for item in session.items):
        try:
            start_ray()
        except Exception as err:  # e.g. the node timed out starting beside the scenarios' clusters on a loaded
            # machine: not fatal here, the first test that needs Ray starts it again (ray_session)
            import ray

            ray.shutdown()
            print(f"\nconftest: the session's Ray did not start at collection ({type(err).__name__}); "
                  "it starts with the first test that needs it")
    if "test_job_submit.py" in files:  # after the session's Ray, whose start writes the auth token the head uses
        background.start_head()


def pytest_sessionfinish(session, exitstatus):
    from tests.integration import background

    background.stop_all()


def start_ray():
    import ray

    from elastic.driver.connect import PRELOAD

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 _system_config=PRELOAD)
    return ray


@pytest.fixture(scope="session")
def ray_session():
    ray = start_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def pool(ray_session):
    """A RayWorkerGroup with 4 live workers; tests set ``pool.cfg`` and form their own placements."""
    from elastic.driver.ray_group import RayWorkerGroup
    from tests.helpers import tiny_config

    group = RayWorkerGroup(tiny_config())
    group.spawn(4)
    yield group
    group.shutdown()


def four_warm(pool) -> None:
    """Exactly 4 warm workers: replacements a test's controller left starting are waited for, lost ones replaced,
    any beyond four removed (a test that counts workers must not inherit a fifth)."""
    pool.wait_warm(120)
    missing = 4 - len(pool.warm())
    if missing > 0:
        pool.spawn(missing)
    pool.remove(pool.warm()[4:])


@pytest.fixture
def fresh_pool(pool):
    """The shared pool with exactly 4 warm workers, before and after tests that kill or add some."""
    four_warm(pool)
    yield pool
    four_warm(pool)
