"""Run storage: Ray Train's default, local folders, and URIs through pyarrow.fs (a file:// bucket here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from elastic.tools.storage import RunStorage, persist, run_storage


def test_default_is_ray_trains_and_paths_are_absolute(monkeypatch, tmp_path):
    monkeypatch.delenv("ELASTIC_STORAGE_PATH", raising=False)
    assert run_storage("job1").local == Path("~/ray_results/job1").expanduser()
    monkeypatch.chdir(tmp_path)
    assert run_storage("job1", "store").local == tmp_path / "store" / "job1"
    assert run_storage("job1", "store", run_dir="mine").local == tmp_path / "mine"
    monkeypatch.setenv("ELASTIC_STORAGE_PATH", str(tmp_path / "env"))
    assert run_storage("job1").local == tmp_path / "env" / "job1"


def test_uri_storage_is_staged_then_copied(tmp_path):
    import pyarrow.fs

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    # A URI scheme pyarrow.fs resolves without network: its local filesystem, addressed as a URI.
    uri = f"file://{bucket}"
    storage = run_storage("job2", uri)
    assert storage.remote is None and storage.local == bucket / "job2"  # file:// is written directly
    fs, _ = pyarrow.fs.FileSystem.from_uri(uri)
    # A remote run (as s3:// would give): staged locally, copied with pyarrow.fs at the end.
    remote = RunStorage(tmp_path / "staging", f"{uri}/job3")
    (remote.local / "adapter").mkdir(parents=True)
    (remote.local / "metrics.jsonl").write_text("{}\n")
    (remote.local / "adapter" / "adapter_config.json").write_text("{}")
    persist(remote)
    assert (bucket / "job3" / "metrics.jsonl").read_text() == "{}\n"
    assert (bucket / "job3" / "adapter" / "adapter_config.json").is_file()
    assert fs.get_file_info(str(bucket / "job3")).type == pyarrow.fs.FileType.Directory


def test_a_bad_uri_is_one_clear_error():
    with pytest.raises(ValueError, match="--storage-path 'nosuch://x' is not a storage URI pyarrow.fs can open"):
        run_storage("job", "nosuch://x")
