"""Mutation check: plant one deliberate bug at a time and show that the tests catch each.

For every mutation it copies the repository to a temporary folder, applies the one-line change there
(the working tree is never touched), runs the tests that should catch it with that copy first on the
path, and reports CAUGHT (a test's assertion failed), MISSED (they passed: a hole in the suite) or
BROKEN (the mutant did not even run: a bad mutation, not a caught one). It exits 1 unless every
mutation is caught. Not part of ``make test`` (about 3 minutes on 2 cores).

    .venv/bin/python tests/mutation/run.py            # all mutations
    .venv/bin/python tests/mutation/run.py cursor lr  # some of them, by name
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UNIT = "tests/unit/test_engine_reference.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation("cursor", "the data cursor is off by one step", "elastic/runtime/engine.py",
             "mine = self.sampler.slice_indices(step, ", "mine = self.sampler.slice_indices(step + 1, ", (UNIT,)),
    Mutation("bias-correction", "AdamW's bias correction is one step ahead", "elastic/runtime/engine.py",
             'entry = {"step": torch.tensor(float(self.step), ', 'entry = {"step": torch.tensor(float(self.step + 1), ',
             (UNIT,)),
    Mutation("local-normaliser", "each rank divides its loss by its own token count, not the global batch's",
             "elastic/runtime/engine.py", "self._n_targets = n_targets = self.global_targets(step)",
             "self._n_targets = n_targets = max(1, int((self.dataset.batch(self.sampler.slice_indices(step, "
             "layout.data_index(self.rank), layout.data_parallel))[1] != -100).sum()))",
             ("tests/integration/test_equivalence.py::test_layout_matches_single_process[float64-dp=2]",)),
    Mutation("reshard-skips-a-tensor", "a reshard does not move the final norm's weight", "elastic/runtime/transfer.py",
             "    for rnd, tag, t in work:\n",
             "    for rnd, tag, t in work:\n        if t.tensor == 'model.norm.weight':\n            continue\n",
             ("tests/integration/test_reshard_live.py::test_round_trip_is_bit_identical",)),
    Mutation("lr-shift", "the learning-rate schedule runs one step ahead", "elastic/runtime/optim.py",
             "    if cfg.warmup_steps and step < cfg.warmup_steps:", "    step += 1\n"
             "    if cfg.warmup_steps and step < cfg.warmup_steps:", (UNIT,)),
    Mutation("lora-scaling", "LoRA scales by alpha / sqrt(r) instead of alpha / r", "elastic/model/lora.py",
             "self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r",
             "self.scaling = alpha / r if use_rslora else alpha / math.sqrt(r)", (f"{UNIT}::"
             "test_engine_at_world_one_equals_the_reference[lora]",)),
)


def copy_repo(to: Path) -> None:
    for part in ("elastic", "launch", "tests", "pyproject.toml"):
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, to / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, to / part)


def run(m: Mutation) -> tuple[str, float, str]:
    with tempfile.TemporaryDirectory(prefix=f"elastic-mutant-{m.name}-") as tmp:
        tmp = Path(tmp)
        copy_repo(tmp)
        target = tmp / m.file
        text = target.read_text()
        if text.count(m.old) != 1:
            raise SystemExit(f"mutation {m.name}: {m.old!r} occurs {text.count(m.old)} times in {m.file}; update it")
        target.write_text(text.replace(m.old, m.new))
        env = dict(os.environ, PYTHONPATH=str(tmp))
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests],
                             cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
        lines = out.stdout.splitlines()
        asserted = [line for line in lines if line.startswith("E ") and "Error" not in line.split(":")[0]]
        if out.returncode == 0:
            verdict = "MISSED"
        elif out.returncode == 1 and any("AssertionError" in line or "assert" in line for line in lines):
            verdict = "CAUGHT"
        else:
            verdict = "BROKEN"
        first = (asserted or [line for line in lines if line.strip()][-1:] or ["(no output)"])[0]
        return verdict, time.perf_counter() - started, first[2:].strip()[:110]


def main() -> int:
    chosen = [m for m in MUTATIONS if not sys.argv[1:] or m.name in sys.argv[1:]]
    missed = 0
    print(f"{'mutation':24} {'verdict':8} {'seconds':>7}  the failing assertion")
    for m in chosen:
        verdict, seconds, first = run(m)
        missed += verdict != "CAUGHT"
        print(f"{m.name:24} {verdict:8} {seconds:7.1f}  {first}")
        print(f"{'':24} ({m.what})")
    print(f"{len(chosen) - missed} of {len(chosen)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
