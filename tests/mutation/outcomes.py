"""A pytest plugin for ``tests/mutation/run.py``: records how each test of a mutant's run ended, from
pytest's own reports, and ends the session at the first test whose own check failed.

Each test is recorded as one of:

- ``passed``;
- ``assertion``: the test's check failed: an ``AssertionError`` (a bare ``assert``, ``torch.testing``,
  ``pytest.approx``) or ``pytest.fail`` / ``pytest.raises``' "DID NOT RAISE", raised where the innermost
  frame of this repository in the traceback is a test file (``tests/``), not our code;
- ``error``: anything else: an exception from our code (including an ``assert`` of ``elastic/`` itself),
  a crash, a failing fixture, a timeout, a collection error.

The records go to the JSON file named by ``MUTATION_OUTCOMES`` (one list of [nodeid, kind, message]).
Loaded with ``-p tests.mutation.outcomes`` by the run script, never by ``make test``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_records: list[list[str]] = []


def _repo_frame(excinfo) -> Path | None:
    """The path of the innermost traceback frame inside this repository (None if none is)."""
    for entry in reversed(excinfo.traceback):
        path = Path(str(entry.path)).resolve()
        if path.is_relative_to(ROOT):
            return path
    return None


def classify(excinfo) -> str:
    if excinfo is None:
        return "error"
    failed = excinfo.errisinstance(pytest.fail.Exception) and not str(excinfo.value).startswith("Timeout")
    if not (excinfo.errisinstance(AssertionError) or failed):
        return "error"
    frame = _repo_frame(excinfo)
    return "assertion" if frame is not None and frame.is_relative_to(ROOT / "tests") else "error"


def _message(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return " ".join(text.split())[:300]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.passed and report.when == "call":
        _records.append([item.nodeid, "passed", ""])
    elif report.failed:
        kind = classify(call.excinfo) if report.when == "call" else "error"  # setup/teardown: a fixture broke
        _records.append([item.nodeid, kind, _message(report)])
        if kind == "assertion":
            item.session.shouldstop = "a test's assertion failed: the mutant is caught"


def pytest_collection_modifyitems(session, config, items):
    """Run the tests of ``MUTATION_FIRST`` (comma-separated path prefixes) first: the ones that cover the
    mutant's concept. Only the order changes (a mutant nothing catches still runs the whole tier), so a
    caught mutant usually stops early."""
    first = tuple(p for p in os.environ.get("MUTATION_FIRST", "").split(",") if p)
    items.sort(key=lambda item: not item.nodeid.startswith(first))  # stable: the rest keep their order


def pytest_collectreport(report):
    if report.failed:
        _records.append([report.nodeid or "<collection>", "error", _message(report)])


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("MUTATION_OUTCOMES")
    if path:
        Path(path).write_text(json.dumps(_records))
