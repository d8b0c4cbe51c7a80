"""Layout-independent checkpoints: real safetensors files, every corruption gets its own error."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch

from elastic.core import checkpoint as ckpt
from elastic.core.layout import Layout, Placement
from elastic.model.specs import training_specs
from tests.helpers import tiny_config
from tests.reference import train_reference


def write_checkpoint(root, cfg, full, placement, step=4, writer="job"):
    """Write ``full`` as the workers of ``placement`` would (each its boxes, each box once)."""
    specs = training_specs(cfg)
    n = cfg.model.n_layers
    entries = ckpt.writers(placement, specs, n)
    tmp = ckpt.new_folder(root, step, writer)
    files = []
    for rank, worker in enumerate(placement.workers):
        if not entries[worker]:
            continue
        boxes = {s.name: placement.box(s, rank, n) for s in specs if placement.box(s, rank, n) is not None}
        local = {name: full[name][tuple(slice(a, b) for a, b in box)] for name, box in boxes.items()}
        files.append(ckpt.write_shard(tmp, worker, local, entries[worker], boxes))
    return ckpt.finalize(tmp, root, step, cfg, specs, files)


@pytest.fixture(scope="module")
def trained():
    cfg = tiny_config(steps=4)
    full = train_reference(cfg).tensors
    return cfg, full


def test_save_in_one_layout_read_in_another(tmp_path, trained):
    cfg, full = trained
    folder = write_checkpoint(tmp_path, cfg, full, Placement(Layout(dp=2, tp=2), (0, 1, 2, 3)))
    assert ckpt.latest(tmp_path) == folder
    specs = training_specs(cfg)
    # Every training tensor is in some shard file, both AdamW moments included (before open_checkpoint would
    # refuse the folder for it).
    manifest = json.loads((folder / "manifest.json").read_text())
    written = {name for f in manifest["files"] for name, _ in f["tensors"]}
    assert written == {s.name for s in specs}, sorted({s.name for s in specs} ^ written)[:4]
    assert any(name.endswith("::exp_avg_sq") for name in written)
    checkpoint = ckpt.open_checkpoint(folder, cfg, specs)
    assert checkpoint.step == 4
    target = Placement(Layout(fsdp=3), (7, 8, 9))
    for rank in range(3):
        wanted = {s.name: target.box(s, rank, cfg.model.n_layers) for s in specs}
        got = ckpt.read_boxes(checkpoint, wanted, torch.float64)
        for name, box in wanted.items():
            assert torch.equal(got[name], full[name][tuple(slice(a, b) for a, b in box)])
    # Replicas are written once: dp=2 x tp=2 writes as many bytes as one replica holds.
    written = sum(f["bytes"] for f in manifest["files"])
    assert written < 1.2 * sum(v.numel() * 8 for v in full.values())


def test_no_pickle_in_the_files(tmp_path, trained):
    cfg, full = trained
    folder = write_checkpoint(tmp_path, cfg, full, Placement(Layout(fsdp=2), (0, 1)))
    assert {p.suffix for p in folder.iterdir()} == {".json", ".safetensors"}


@pytest.mark.parametrize("damage, words", [
    ("truncate", "bytes, manifest says"),
    ("flip", "checksum mismatch"),
    ("delete", "shard missing"),
    ("manifest", "not valid JSON"),
    ("drop-entry", "a shard is missing"),
])
def test_corruption_is_named(tmp_path, trained, damage, words):
    cfg, full = trained
    folder = write_checkpoint(tmp_path, cfg, full, Placement(Layout(fsdp=2), (0, 1)))
    shard = sorted(folder.glob("*.safetensors"))[1]
    manifest_path = folder / "manifest.json"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[-10] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "delete":
        shard.unlink()
    elif damage == "manifest":
        manifest_path.write_text(manifest_path.read_text()[:50])
    elif damage == "drop-entry":
        manifest = json.loads(manifest_path.read_text())
        manifest["files"] = manifest["files"][:1]
        manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match=words) as err:
        ckpt.open_checkpoint(folder, cfg, training_specs(cfg))
    if damage in ("truncate", "flip", "delete"):
        assert shard.name in str(err.value)


def test_other_model_config_is_refused(tmp_path, trained):
    cfg, full = trained
    folder = write_checkpoint(tmp_path, cfg, full, Placement(Layout(dp=1), (0,)))
    other = cfg.replace(model=dataclasses.replace(cfg.model, ffn_dim=96))
    with pytest.raises(ckpt.CheckpointError, match=r"another model config .*ffn_dim"):
        ckpt.open_checkpoint(folder, other, training_specs(other))


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, trained):
    cfg, full = trained
    first = write_checkpoint(tmp_path, cfg, full, Placement(Layout(dp=1), (0,)), step=4)
    tmp = ckpt.new_folder(tmp_path, 8, "job")  # a second write that crashes before finalize
    (tmp / "shard-00000.safetensors").write_bytes(b"partial")
    assert ckpt.latest(tmp_path) == first
    assert ckpt.open_checkpoint(ckpt.latest(tmp_path), cfg, training_specs(cfg)).step == 4  # complete, and opens
    write_checkpoint(tmp_path, cfg, full, Placement(Layout(dp=1), (0,)), step=12)
    ckpt.sweep(tmp_path, "job")
    assert not list(tmp_path.glob(".step_*"))  # this job's stale temporary folders are cleaned up
    shutil.rmtree(tmp_path / "step_000012")
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.latest(tmp_path)


def test_a_replay_reaching_a_step_on_disk_keeps_that_copy_and_latest_never_dangles(tmp_path, trained, monkeypatch):
    """A recovery replays steps and reaches a checkpointed step again: the copy on disk stays (it is a complete
    checkpoint of that step); nothing is removed before something else is in place."""
    cfg, full = trained
    first = write_checkpoint(tmp_path, cfg, full, Placement(Layout(dp=1), (0,)), step=4)
    before = {f.name: f.stat().st_ino for f in first.iterdir()}
    again = write_checkpoint(tmp_path, cfg, full, Placement(Layout(fsdp=2), (0, 1)), step=4)
    assert again == first and {f.name: f.stat().st_ino for f in first.iterdir()} == before
    assert not list(tmp_path.glob(".step_*"))  # the new copy was dropped whole
    # A crash while the pointer is replaced (the last rename) leaves the previous pointer, which names a
    # complete checkpoint.
    real = os.replace
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError("killed here"))
                        if str(b).endswith("latest") else real(a, b))
    with pytest.raises(OSError, match="killed here"):
        write_checkpoint(tmp_path, cfg, full, Placement(Layout(dp=1), (0,)), step=8)
    monkeypatch.setattr(ckpt.os, "replace", real)
    assert ckpt.latest(tmp_path) == first
    assert ckpt.open_checkpoint(ckpt.latest(tmp_path), cfg, training_specs(cfg)).step == 4  # complete, and opens


def test_sweep_touches_only_its_own_writers_leftovers_and_prune_keeps_the_newest(tmp_path, trained):
    cfg, full = trained
    mine, theirs = ckpt.new_folder(tmp_path, 9, "job-a"), ckpt.new_folder(tmp_path, 9, "job-b")
    ckpt.sweep(tmp_path, "job-a")
    assert not mine.exists() and theirs.exists()  # another job's write in a shared folder is left alone
    for step in (4, 8, 12):
        write_checkpoint(tmp_path, cfg, full, Placement(Layout(dp=1), (0,)), step=step)
    assert [f.name for f in ckpt.prune(tmp_path, keep=2)] == ["step_000004"]
    assert sorted(f.name for f in tmp_path.glob("step_*")) == ["step_000008", "step_000012"]


def test_an_unwritable_checkpoint_folder_is_refused_by_name(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(ckpt.CheckpointError, match=f"cannot be written to {blocked / 'ckpt'}"):
        ckpt.writable(blocked / "ckpt")
