"""Layout-independent checkpoints on disk: safetensors shards plus a JSON manifest.

Only for restarting a whole job; the live path (reshards, recoveries) never touches disk.

Layout on disk::

    <dir>/step_000120/manifest.json           global shapes, step, config, per-file sha256
    <dir>/step_000120/shard-00003.safetensors  the boxes worker 3 wrote (keys "<tensor>@<box>")
    <dir>/latest                               name of the newest complete checkpoint

Every distinct box is written once (by the lowest rank holding it), so replicas cost nothing.
A checkpoint is built in a temporary folder (named for its writer, so that a writer sweeps only its own
leftovers in a shared folder), every file and the folder are fsynced, then it is renamed into place and
``latest`` replaced atomically. A step already on disk is never rewritten (a replay after a recovery
reaches the same step again: the copy on disk stays, the new one is dropped), so no crash can leave
``latest`` naming a folder that is gone. ``prune`` keeps the newest few. Reading validates everything
(manifest, config, files, sizes, checksums, coverage) before any state is handed out, so a bad
checkpoint never half-applies. No pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from elastic.core.boxes import Box, box_numel, copy_overlap, intersect, local_slices
from elastic.core.config import Config
from elastic.core.layout import Placement, TensorSpec

FORMAT = "elastic-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and the problem."""


def _key(name: str, box: Box) -> str:
    return f"{name}@" + ",".join(f"{lo}:{hi}" for lo, hi in box)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def writers(placement: Placement, specs: list[TensorSpec], n_layers: int) -> dict[int, list[tuple[str, Box]]]:
    """worker -> the (tensor, box) pairs it writes: each distinct box once, by its lowest rank."""
    out: dict[int, list[tuple[str, Box]]] = {w: [] for w in placement.workers}
    for spec in specs:
        seen: set[Box] = set()
        for worker, box in placement.holders(spec, n_layers):
            if box not in seen and box_numel(box) > 0:
                seen.add(box)
                out[worker].append((spec.name, box))
    return out


def write_shard(folder: Path, worker: int, tensors: dict[str, torch.Tensor],
                entries: list[tuple[str, Box]], boxes: dict[str, Box]) -> dict:
    """Write this worker's share (run inside the worker). Returns the manifest entry for the file."""
    data = {}
    for name, box in entries:
        local = tensors[name][local_slices(box, boxes[name])]
        data[_key(name, box)] = local.contiguous()
    path = folder / f"shard-{worker:05d}.safetensors"
    save_file(data, str(path))
    _fsync(path)
    return {"file": path.name, "sha256": _sha256(path), "bytes": path.stat().st_size,
            "tensors": [[name, [list(iv) for iv in box]] for name, box in entries]}


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_folder(root: Path, step: int, writer: str) -> Path:
    """A fresh temporary folder next to where ``step``'s checkpoint will live, named for ``writer`` (a job)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".step_{step:06d}.tmp-{writer}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def sweep(root: Path, writer: str, keep: Path | None = None) -> None:
    """Remove ``writer``'s temporary folders in ``root`` (left by writes that crashed), but ``keep``."""
    for stale in Path(root).glob(f".step_*.tmp-{writer}-*"):
        if stale != keep:
            shutil.rmtree(stale, ignore_errors=True)


def writable(root: Path) -> None:
    """Raise CheckpointError, naming the folder, unless checkpoints can be written there (checked at start)."""
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        probe = Path(root) / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(f"checkpoints cannot be written to {root} ({err.strerror}); choose a writable "
                              "--checkpoint-dir (or --storage-path)") from None


def finalize(tmp: Path, root: Path, step: int, cfg: Config, specs: list[TensorSpec], files: list[dict]) -> Path:
    """Write the manifest, move the folder into place and point ``latest`` at it (all atomic renames)."""
    manifest = {"format": FORMAT, "step": step, "data_cursor": step * cfg.train.global_batch,
                "rng": {"seed": cfg.train.seed, "note": "all randomness is a function of (seed, step, index)"},
                "config": cfg.to_dict(), "dtype": cfg.train.dtype,
                "tensors": {s.name: list(s.shape) for s in specs}, "files": files}
    with open(tmp / "manifest.json", "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync(tmp)
    final = root / f"step_{step:06d}"
    if (final / "manifest.json").is_file():  # a replay reached a step already on disk: keep that copy
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)
    pointer = root / f".latest.tmp-{uuid.uuid4().hex[:8]}"
    pointer.write_text(final.name)
    _fsync(pointer)
    os.replace(pointer, root / "latest")
    _fsync(root)
    return final


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (never the one ``latest`` names); returns them."""
    current = latest(root)
    done = sorted((f for f in Path(root).glob("step_*") if (f / "manifest.json").is_file()), key=lambda f: f.name)
    doomed = [f for f in done[:-keep] if f != current] if keep > 0 else []
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


@dataclass
class Checkpoint:
    folder: Path
    step: int
    pieces: dict[str, list[tuple[Path, str, Box]]]  # tensor -> (file, key, box)


def latest(root: Path) -> Path:
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        raise CheckpointError(f"{root}: no complete checkpoint (no 'latest' file); nothing to resume from")
    folder = Path(root) / pointer.read_text().strip()
    if not folder.is_dir():
        raise CheckpointError(f"{pointer} names {folder.name}, which does not exist")
    return folder


def open_checkpoint(folder: Path, cfg: Config, specs: list[TensorSpec], verify: bool = True) -> Checkpoint:
    """Read and validate a checkpoint folder against ``cfg``. Raises CheckpointError naming the problem."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: manifest missing; the checkpoint is incomplete")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    saved_model = manifest["config"]["model"]
    if saved_model != cfg.to_dict()["model"]:
        diff = {k: (v, cfg.to_dict()["model"].get(k)) for k, v in saved_model.items()
                if cfg.to_dict()["model"].get(k) != v}
        raise CheckpointError(f"{path}: saved for another model config (saved vs now: {diff}); "
                              "resume with the model config the checkpoint was written with")
    if manifest["dtype"] != cfg.train.dtype:
        raise CheckpointError(f"{path}: saved in {manifest['dtype']}, this run uses {cfg.train.dtype}")
    expected = {s.name: list(s.shape) for s in specs}
    if manifest["tensors"] != expected:
        missing = sorted(set(expected) - set(manifest["tensors"]))[:3]
        raise CheckpointError(f"{path}: tensor set or shapes differ from this run's (e.g. missing {missing})")
    pieces: dict[str, list[tuple[Path, str, Box]]] = {name: [] for name in expected}
    for entry in manifest["files"]:
        file = folder / entry["file"]
        if not file.is_file():
            raise CheckpointError(f"{file}: shard missing")
        if file.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, manifest says {entry['bytes']} (truncated?)")
        if verify and _sha256(file) != entry["sha256"]:
            raise CheckpointError(f"{file}: checksum mismatch; the file is corrupted")
        for name, box in entry["tensors"]:
            box = tuple((lo, hi) for lo, hi in box)
            pieces[name].append((file, _key(name, box), box))
    for name, shape in expected.items():
        covered = sum(box_numel(b) for _, _, b in pieces[name])
        total = 1
        for n in shape:
            total *= n
        if covered != total:
            raise CheckpointError(f"{folder}: tensor {name} is covered {covered}/{total} elements; a shard is missing")
    return Checkpoint(folder, int(manifest["step"]), pieces)


def read_boxes(ckpt: Checkpoint, wanted: dict[str, Box], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors ``wanted`` (name -> box) assembled from the shards, reading only the slices needed."""
    out = {name: torch.empty(tuple(hi - lo for lo, hi in box), dtype=dtype) for name, box in wanted.items()}
    by_file: dict[Path, list[tuple[str, str, Box]]] = {}
    for name, box in wanted.items():
        for file, key, piece_box in ckpt.pieces[name]:
            if intersect(piece_box, box) is not None:
                by_file.setdefault(file, []).append((name, key, piece_box))
    for file, items in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as fh:
                for name, key, piece_box in items:
                    copy_overlap(out[name], wanted[name], fh.get_slice(key), piece_box)
        except Exception as err:  # safetensors reports corruption as assorted errors
            raise CheckpointError(f"{file}: cannot be read ({type(err).__name__}: {err})") from None
    return out
