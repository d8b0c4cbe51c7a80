"""Subprocess scenarios that need Ray clusters of their own, started in the background at session start.

``cluster_scenario`` and ``nodes_scenario`` each start a multi-node ``cluster_utils`` cluster in a child
process. They take a minute or more, mostly waiting on Ray and on workers importing torch, so
``tests/conftest.py`` starts the ones the session's tests need as soon as collection is done, and the unit
tier runs meanwhile; the tests then read the results (``result``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
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


def stop_all() -> None:
    for proc, _ in _running.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
