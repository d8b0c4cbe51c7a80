"""What names a job, and what a run of the same command finds: its run folder, a finished run, a live twin.

A job is named by ``--job-name``, or else by its recipe and a digest of its whole effective configuration, so
that running the same command again (after the driver was lost) finds the same run folder and resumes from
its newest checkpoint; a different configuration is a different job. A name is one path segment. A run folder
whose ``summary.json`` says every step is done is a finished job: the command says so instead of training
again. Two live jobs of one name would share a control actor and a run folder, so the second is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def job_name(recipe: str, cfg, given: str | None) -> str:
    """``given`` (checked), or ``<recipe>-<digest of the configuration>``."""
    if given is not None:
        if not NAME.fullmatch(given):
            raise ValueError(f"--job-name {given!r} must be one path segment of letters, digits, '.', '_' or '-' "
                             "(starting with a letter or digit); it names the run's folder and its control actor")
        return given
    digest = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{recipe}-{digest}"


def finished(run_dir: Path, steps: int) -> dict | None:
    """The summary of a run in ``run_dir`` that did all ``steps`` steps, else None."""
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return summary if summary.get("finished") and summary.get("last_step") == steps else None


def refuse_twin(job: str) -> None:
    """Raise ValueError if a job named ``job`` is running on this Ray cluster (Ray must be connected)."""
    import ray

    from elastic.control.control_plane import NAMESPACE, actor_name

    try:
        ray.get_actor(actor_name(job), namespace=NAMESPACE)
    except ValueError:
        return
    raise ValueError(f"a job named {job!r} is already running on this cluster; choose another --job-name, or stop "
                     f"it first: elastic events --job {job} stop")
