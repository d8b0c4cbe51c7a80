"""Mutation check: plant one deliberate bug at a time and show that the test suite catches each.

For every mutant it copies the repository to a temporary folder (``git archive HEAD`` by default; the
working tree with ``--worktree``; ``/work/main`` itself is never touched, so other people's edits in
progress neither disturb a run nor are disturbed by it), applies the mutant's edits there, and runs the
whole relevant tier with that copy first on the path: ``tests/unit`` and ``tests/controller``, then the
integration files that cover the mutant. ``tests/mutation/outcomes.py`` (a pytest plugin) records how
each test ended from pytest's own reports and stops the run at the first test whose own check failed.
The verdict:

- CAUGHT: some test's assertion failed (``AssertionError`` or ``pytest.fail`` raised from a test file,
  not from our code), and that test passes on the unmutated copy (else it is set aside as already
  failing and the tier runs again without it);
- BROKEN: no assertion failed but something errored: an exception or an ``assert`` in our code, a crash,
  a fixture, a timeout, a collection error. A crash is not a catch: the tests did not say what is wrong;
- MISSED: every test passed: a hole in the suite.

It prints one row per mutant and the score, and exits 1 unless every mutant is CAUGHT. Not part of
``make test`` (it runs the unit and controller tiers once per mutant). On this 2-core machine run it niced:

    nice -n 10 .venv/bin/python -m tests.mutation.run                      # every mutant, at HEAD
    nice -n 10 .venv/bin/python -m tests.mutation.run top-p-order cursor   # some, by name
    nice -n 10 .venv/bin/python -m tests.mutation.run --worktree --integration none grpo-bessel
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.mutation.mutants import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parents[2]
TIER = ("tests/unit", "tests/controller")
RUN_TIMEOUT_S = 3600


@dataclass
class Outcome:
    verdict: str
    seconds: float
    tests: int
    by: str  # the catching test and its message, or what broke


def copy_repo(to: Path, worktree: bool) -> None:
    """The repository's files at HEAD (``git archive``), or its working tree (tracked and untracked files)."""
    if not worktree:
        data = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, check=True,
                              capture_output=True).stdout
        with tempfile.TemporaryFile() as fh:
            fh.write(data)
            fh.seek(0)
            with tarfile.open(fileobj=fh) as tar:
                tar.extractall(to, filter="data")
        return
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, to / name)


def apply(m: Mutant, tree: Path) -> None:
    for edit in m.edits:
        path = tree / edit.file
        text = path.read_text()
        if text.count(edit.old) != 1:
            raise SystemExit(f"mutant {m.name}: {edit.old!r} occurs {text.count(edit.old)} times in {edit.file}; "
                             "update tests/mutation/mutants.py")
        path.write_text(text.replace(edit.old, edit.new))


def pytest(tree: Path, paths: list[str], deselect: set[str], timeout: float,
           first: tuple[str, ...] = ()) -> tuple[int, list[list[str]]]:
    """Run pytest in ``tree`` on ``paths`` (the tests under ``first`` first); (its exit code, the records)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        records = Path(fh.name)
    env = dict(os.environ, PYTHONPATH=str(tree), MUTATION_OUTCOMES=str(records), MUTATION_FIRST=",".join(first))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.mutation.outcomes",
           *[f"--deselect={t}" for t in sorted(deselect)], *paths]
    try:
        out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        code = out.returncode
        found = json.loads(records.read_text() or "[]") if records.stat().st_size else []
        if code not in (0, 1) and not any(r[1] == "error" for r in found):  # pytest itself failed: say how
            tail = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()][-3:]
            found.append(["<run>", "error", f"pytest exited with {code}: " + " | ".join(tail)])
    except subprocess.TimeoutExpired:
        code, found = -1, [["<run>", "error", f"the run took longer than {timeout:.0f} s"]]
    finally:
        records.unlink(missing_ok=True)
    return code, found


class Runner:
    def __init__(self, worktree: bool, integration: bool) -> None:
        self.worktree, self.integration = worktree, integration
        self.clean = Path(tempfile.mkdtemp(prefix="elastic-mutation-clean-"))
        copy_repo(self.clean, worktree)
        self.failing_clean: set[str] = set()  # tests that fail without any mutant: never a catch
        self.passing_clean: set[str] = set()

    def close(self) -> None:
        shutil.rmtree(self.clean, ignore_errors=True)

    def passes_clean(self, test: str) -> bool:
        if test not in self.passing_clean and test not in self.failing_clean:
            code, _ = pytest(self.clean, [test], set(), 900)
            (self.passing_clean if code == 0 else self.failing_clean).add(test)
        return test in self.passing_clean

    def run(self, m: Mutant) -> Outcome:
        started, tests = time.perf_counter(), 0
        paths = [*TIER, *(m.integration if self.integration else ())]
        with tempfile.TemporaryDirectory(prefix=f"elastic-mutant-{m.name}-") as tmp:
            tree = Path(tmp)
            copy_repo(tree, self.worktree)
            apply(m, tree)
            for _attempt in range(3):
                code, records = pytest(tree, paths, self.failing_clean, RUN_TIMEOUT_S, m.first)
                if code != 3 or any(r[0] != "<run>" for r in records):
                    break  # pytest ran the tests; 3 with no test run is its own INTERNALERROR (e.g. a
                time.sleep(30)  # session-start Ray that timed out on a loaded machine): not the mutant's doing
            while True:
                tests += sum(1 for r in records if r[1] in ("passed", "assertion"))
                caught = next((r for r in records if r[1] == "assertion"), None)
                if caught is not None and not self.passes_clean(caught[0]):
                    # it fails without the mutant too: set aside, run the tier again without it
                    code, records = pytest(tree, paths, self.failing_clean, RUN_TIMEOUT_S, m.first)
                    continue
                seconds = time.perf_counter() - started
                if caught is not None:
                    return Outcome("CAUGHT", seconds, tests, f"{caught[0]}: {caught[2]}")
                errors = [r for r in records if r[1] == "error"]
                if errors or code not in (0, 1):
                    first = errors[0] if errors else ["<run>", "error", f"pytest exited with {code}"]
                    return Outcome("BROKEN", seconds, tests, f"{first[0]}: {first[2]}")
                return Outcome("MISSED", seconds, tests, f"all {tests} tests passed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--worktree", action="store_true", help="mutate a copy of the working tree, not HEAD")
    parser.add_argument("--integration", choices=("all", "none"), default="all",
                        help="'none': unit and controller tiers only (a quick look; the score needs 'all')")
    args = parser.parse_args()
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        raise SystemExit(f"unknown mutants {sorted(unknown)}; known: {[m.name for m in MUTANTS]}")
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    runner = Runner(args.worktree, args.integration == "all")
    counts = {"CAUGHT": 0, "BROKEN": 0, "MISSED": 0}
    print(f"{'mutant':22} {'verdict':7} {'seconds':>7} {'tests':>5}  caught by (or what broke)", flush=True)
    try:
        for m in chosen:
            out = runner.run(m)
            counts[out.verdict] += 1
            print(f"{m.name:22} {out.verdict:7} {out.seconds:7.0f} {out.tests:5}  {out.by[:150]}", flush=True)
            tier = [*TIER, *(m.integration if runner.integration else ())]
            print(f"{'':22} ({m.what}; tier: {' '.join(tier)})", flush=True)
    finally:
        runner.close()
    if runner.failing_clean:
        print(f"set aside (they fail without a mutant): {sorted(runner.failing_clean)}")
    print(f"score: {counts['CAUGHT']} of {len(chosen)} mutants caught ({counts['BROKEN']} broken, "
          f"{counts['MISSED']} missed)")
    return 0 if counts["CAUGHT"] == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
