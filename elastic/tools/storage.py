"""Where a run's outputs live: a storage path that outlives the job, as Ray Train's
``RunConfig(storage_path=...)``.

A job started by ``ray job submit`` runs in Ray's temporary copy of the working directory, which is
deleted with the cluster, so a relative ``runs/<job>`` would vanish. Outputs (metrics, events, the
plot, adapters, checkpoints) go to ``<storage_path>/<job>`` instead:

- the default is Ray Train's, ``~/ray_results`` (``ELASTIC_STORAGE_PATH`` overrides it);
- a local path or a ``file://`` URI is written directly;
- any other URI that ``pyarrow.fs`` understands (``s3://``, ``gs://``, ``hdfs://``, ...) is written to a
  local staging folder during the run and copied there with ``pyarrow.fs.copy_files`` at the end.

No torch, no ray.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STORAGE = "~/ray_results"


@dataclass(frozen=True)
class RunStorage:
    local: Path  # where the run writes, absolute
    remote: str | None = None  # the URI it is copied to at the end (None: ``local`` is the destination)

    @property
    def shown(self) -> str:
        """The run's outputs as a person should look them up."""
        return self.remote or str(self.local)


def run_storage(job: str, storage_path: str | None = None, run_dir: str | None = None) -> RunStorage:
    """The run's storage: ``run_dir`` if given, else ``<storage_path>/<job>``."""
    if run_dir:
        return RunStorage(Path(run_dir).expanduser().resolve())
    root = storage_path or os.environ.get("ELASTIC_STORAGE_PATH") or DEFAULT_STORAGE
    if root.startswith("file://"):
        root = root.removeprefix("file://")
    if "://" not in root:
        return RunStorage((Path(root).expanduser() / job).resolve())
    import pyarrow.fs

    try:
        pyarrow.fs.FileSystem.from_uri(root)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError) as err:
        raise ValueError(f"--storage-path {root!r} is not a storage URI pyarrow.fs can open ({err})") from err
    staging = Path(tempfile.mkdtemp(prefix=f"elastic-{job}-"))
    return RunStorage(staging, f"{root.rstrip('/')}/{job}")


def persist(storage: RunStorage) -> None:
    """Copy a staged run to its remote storage (nothing to do for a local one)."""
    if storage.remote is None:
        return
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(storage.remote)
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(str(storage.local), path, source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=fs)
