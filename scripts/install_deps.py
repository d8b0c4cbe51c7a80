"""Install requirements into the virtualenv that runs this script, fast: with uv when it can, with pip otherwise.

uv unpacks and byte-compiles wheels in parallel: a fresh ``.venv`` (torch, Ray, transformers, PEFT, TRL and
the dev tools) took 1 min 48 s of CPU against pip's 3 min 37 s on this 2-core machine (2026-12-07), and the
set-up counts in ``make test``'s budget. uv reads none of pip's configuration, so the settings pip is
configured with here (``pip config list``: find-links, index and extra-index URLs, constraints; e.g. torch's
CPU wheel on local disk) are handed to it as flags, and every index is weighed as pip weighs them
(``--index-strategy unsafe-best-match``), so both resolve the same versions. Byte-compiling is kept: tests run
with ``PYTHONDONTWRITEBYTECODE=1`` here, and without .pyc files every process would compile torch anew.

If uv cannot be installed or fails, pip installs the same requirements, one argument group at a time as before
(torch first). Usage: ``.venv/bin/python scripts/install_deps.py torch==2.13.0 -e '.[dev]'``.
"""

from __future__ import annotations

import subprocess
import sys

# pip's setting -> uv's flag; each may hold several space-separated values
FLAGS = {"find-links": "--find-links", "index-url": "--index-url", "extra-index-url": "--extra-index-url",
         "constraint": "--constraint"}


def pip_settings() -> list[str]:
    """uv flags for what ``pip config list`` reports (environment variables included), in pip's order."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    flags: list[str] = []
    for line in listed.stdout.splitlines():
        key, _, value = line.partition("=")
        flag = FLAGS.get(key.rsplit(".", 1)[-1])
        for item in value.strip().strip("'\"").split() if flag else ():
            if item not in flags:  # pip lists a setting once per place it is set (file, environment)
                flags += [flag, item]
    return flags


def with_uv(requirements: list[str]) -> bool:
    quiet = ["-q", "--disable-pip-version-check"]
    if subprocess.run([sys.executable, "-m", "pip", "install", *quiet, "uv"]).returncode != 0:
        return False
    command = [sys.executable, "-m", "uv", "pip", "install", "-q", "--python", sys.executable, "--compile-bytecode",
               "--index-strategy", "unsafe-best-match", *pip_settings(), *requirements]
    return subprocess.run(command).returncode == 0


def with_pip(requirements: list[str]) -> None:
    groups, current = [], []
    for arg in requirements:  # "-e" binds to the next argument: keep them together
        current.append(arg)
        if arg != "-e":
            groups.append(current)
            current = []
    for group in groups:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *group], check=True)


def main() -> None:
    requirements = sys.argv[1:]
    if not with_uv(requirements):
        print("install_deps: uv was not usable here; installing with pip", file=sys.stderr)
        with_pip(requirements)


if __name__ == "__main__":
    main()
