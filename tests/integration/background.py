"""Subprocess scenarios that need Ray clusters of their own, started in the background at session start.

``cluster_scenario`` and ``nodes_scenario`` each start a multi-node ``cluster_utils`` cluster in a child
process. They take a minute or more, mostly waiting on Ray and on workers importing torch, so
``tests/conftest.py`` starts the ones the session's tests need as soon as collection is done, and the unit
tier runs meanwhile; the tests then read the results (``result``). The `ray job submit` tests' head node
(``ray start --head``, about 15 s) starts then too (``start_head``), and their fixture waits for it (``head``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = {"cluster_scenario": "test_cluster_triggers.py", "nodes_scenario": "test_node_loss.py"}
_running: dict[str, tuple[subprocess.Popen, Path]] = {}


def start(names) -> None:
    """Start each named scenario (a module of tests/integration) once, in the background."""
    for name in names:
        if name not in _running:
            out = Path(tempfile.mkstemp(prefix=f"elastic-{name}-", suffix=".log")[1])
            # Their clusters are their own, on loopback, so without token auth: the session sets
            # RAY_AUTH_MODE=token (conftest), and a cluster_utils head in token mode dies at start when
            # ~/.ray/auth_token does not exist yet (the session's own Ray writes it, but later).
            env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled")
            with open(out, "w") as fh:
                proc = subprocess.Popen([sys.executable, "-m", f"tests.integration.{name}"], cwd=ROOT, env=env,
                                        stdout=fh, stderr=subprocess.STDOUT)
            _running[name] = (proc, out)


def result(name: str, timeout_s: float = 400.0) -> list[dict]:
    """The scenario's ``RESULT`` lines, parsed (started now if it was not yet); fails with its output's tail."""
    start([name])
    proc, out = _running[name]
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    text = out.read_text(errors="replace")
    lines = [json.loads(line[len("RESULT "):]) for line in text.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"{name} exited {proc.returncode}:\n" + text[-4000:]
    return lines


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    """A `ray start --head` cluster of the job-submit tests: its process, ports, temp dir and environment."""

    start: subprocess.Popen
    temp: Path
    port: int
    dashboard: int
    env: dict


_head: list[Head] = []


def start_head() -> Head:
    """Start the job-submit tests' head node in the background (once), on free ports in a private temp dir, with
    token auth; the session's own Ray holds the default ports (e.g. the agent's 52365), so every port is explicit."""
    if _head:
        return _head[0]
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    temp = Path("/tmp") / f"elastic-job-{os.getpid()}"
    agent, agent_grpc, metrics, runtime_env = (free_port() for _ in range(4))
    command = [str(bin_dir / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
               f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
               f"--runtime-env-agent-port={runtime_env}", f"--temp-dir={temp}", "--disable-usage-stats"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _head.append(Head(proc, temp, port, dashboard, env))
    return _head[0]


def head(timeout_s: float = 120.0) -> Head:
    """The head node, once `ray start` has returned (started now if it was not yet); fails with its output.
    One more try if Ray gave up starting it: on a loaded machine its raylet can wait longer than Ray's fixed
    30 s for the dashboard agent (a Python process importing its modules), and `ray start` then exits 1."""
    node = start_head()
    out, _ = node.start.communicate(timeout=timeout_s)
    if node.start.returncode != 0 and "timed out during startup" in out:
        stop_head()
        _head.clear()
        node = start_head()
        out, _ = node.start.communicate(timeout=timeout_s)
    assert node.start.returncode == 0, f"ray start --head exited {node.start.returncode}:\n{out[-3000:]}"
    return node


def cluster_processes(temp: Path) -> list[int]:
    """The processes whose command line names the cluster's temp dir (this process excepted)."""
    mine = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(temp) in cmdline and int(pid) != os.getpid():
            mine.append(int(pid))
    return mine


def stop_head() -> None:
    """Stop only the head's processes (`ray stop` would also kill the test session's own Ray), if it started."""
    if not _head:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        _head[0].start.wait(timeout=120)  # killing a half-started head could leave the rest of it running
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = cluster_processes(_head[0].temp)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(1.0)


def stop_all() -> None:
    for proc, _ in _running.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stop_head()
