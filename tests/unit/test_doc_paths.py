"""The README and docs/ cite files of this repository by path; every cited path must exist.

A doc that names a module which was moved or deleted sends a reader to nothing (docs/scale.md cited three
such modules after the planner moved to ``elastic/plan``). A citation is a backticked path under one of the
repository's top folders; ``module.attr`` references (``tests/helpers.DelayTransfers``) name a file too.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITED = re.compile(r"`((?:elastic|bench|tests|examples|launch|docs)/[\w/.\-]+?)(?:::[\w\[\]\-=,.]+)?`")


def cited_paths(text: str) -> set[str]:
    return set(CITED.findall(text))


GENERATED = ("bench/out/",)  # benchmark outputs: written by `make bench`, not kept in the repository (.gitignore)


def resolves(path: str) -> bool:
    if path.startswith(GENERATED) or (ROOT / path).exists():
        return True
    module, _, attr = path.rpartition(".")  # tests/helpers.DelayTransfers -> tests/helpers.py
    return bool(attr) and (ROOT / f"{module}.py").is_file()


def test_the_regex_finds_a_stale_path():
    assert cited_paths("see `elastic/reshard/rounds.py` and `tests/unit/test_plan.py::test_x`") == {
        "elastic/reshard/rounds.py", "tests/unit/test_plan.py"}
    assert not resolves("elastic/reshard/rounds.py") and resolves("tests/helpers.DelayTransfers")


def test_every_path_the_docs_cite_exists():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = [(doc.name, path) for doc in docs for path in sorted(cited_paths(doc.read_text()))
               if not resolves(path)]
    assert not missing, f"docs cite paths that do not exist: {missing}"
