"""`ray job submit` against a real head node started with `ray start --head` (token auth).

Starts its own cluster on free ports in a private temp dir, submits a short `elastic train` job
through Ray's JobSubmissionClient, polls it to SUCCEEDED, checks the logs, and stops the cluster.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head_node():
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    temp = Path("/tmp") / f"elastic-job-{os.getpid()}"
    # Every port explicit: the test session's own Ray holds the defaults (e.g. the agent's 52365).
    agent, agent_grpc, metrics, runtime_env = (free_port() for _ in range(4))
    start = [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
             f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
             f"--runtime-env-agent-port={runtime_env}", f"--temp-dir={temp}", "--disable-usage-stats"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard}", dict(env, ELASTIC_TEST_GCS_PORT=str(port))
    finally:
        stop_cluster(temp)
        assert not cluster_processes(temp), "the test cluster left processes behind"


def cluster_processes(temp: Path) -> list[int]:
    mine = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(temp) in cmdline and int(pid) != os.getpid():
            mine.append(int(pid))
    return mine


def stop_cluster(temp: Path) -> None:
    """Stop only this cluster's processes (`ray stop` would also kill the test session's own Ray)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in cluster_processes(temp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(1.0)


@pytest.mark.timeout(120)
def test_a_driver_that_imported_ray_first_still_connects(head_node):
    """Ray reads its auth mode at import: connect_ray must switch a process that imported ray without
    RAY_AUTH_MODE to token auth, or the connection retries silently for minutes."""
    address, env = head_node
    gcs = address.replace("http://", "").rsplit(":", 1)[0] + ":" + env["ELASTIC_TEST_GCS_PORT"]
    code = ("import ray; from elastic.driver.connect import connect_ray; "
            f"connect_ray({gcs!r}); print(int(ray.cluster_resources()['CPU']))")
    clean = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip().endswith("2"), out.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_submitted_job_trains_and_succeeds(head_node):
    address, env = head_node
    import shutil

    from ray.job_submission import JobStatus, JobSubmissionClient

    shutil.rmtree("/tmp/elastic-submitted-storage", ignore_errors=True)  # no stale run can pass for this one
    client = JobSubmissionClient(address)
    job = None
    for _ in range(60):  # the head's job agent comes up a few seconds after `ray start` returns
        try:
            job = submit(client, env)
            break
        except RuntimeError as err:
            if "No available agent" not in str(err):
                raise
            time.sleep(1)
    assert job is not None, "the job agent never came up"
    deadline = time.monotonic() + 240
    status = client.get_job_status(job)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(job)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "done: 6 steps" in logs and "dp=2 on workers [0, 1]" in logs
    assert "elastic events --job submitted status" in logs
    # Outputs outlive Ray's temporary copy of the working directory: STORAGE_PATH/<job>, printed absolute.
    assert "outputs in /tmp/elastic-submitted-storage/submitted" in logs
    assert (Path("/tmp/elastic-submitted-storage/submitted") / "metrics.jsonl").is_file()


def submit(client, env) -> str:
    return client.submit_job(
        entrypoint="elastic train --recipe pretrain --model tiny --steps 6 --workers 2 --layout dp=2 "
                   "--no-progress --job-name submitted --runtime.cpus_per_worker 0.25 "
                   "--data.max_corpus_bytes 200000 --data.seq_len 32 --storage-path /tmp/elastic-submitted-storage",
        runtime_env={"working_dir": str(ROOT), "excludes": [".venv", "runs", ".git", "bench/out", "*.png"],
                     "env_vars": {"PATH": env["PATH"]}},
    )
