"""Tokenise a data file once per job: its rows' token ids and loss masks, kept on disk and in the process.

Every engine build builds the dataset: each reshard, each recovery, each new worker. Tokenising a real
chat file (a chat template rendered per assistant turn) takes seconds to minutes, so without a cache every
move of a real run paid it again. Here a file is tokenised once: the result is written as three flat
tensors (``ids``, ``mask``, ``offsets``: row i is ``ids[offsets[i]:offsets[i+1]]``) that every later build,
in this process or another on the same machine, memory-maps (``torch.load(mmap=True)``) instead of
reading the data file. A build in a process that already holds the rows reads nothing at all.

The key is what the rows depend on: the data file (absolute path, size, modification time), the tokenizer
(its folder's tokenizer files, likewise) and ``VERSION`` (bumped when tokenisation changes). The cache lives
in ``ELASTIC_CACHE_DIR``, else ``~/.cache/elastic/tokenized``, one folder per key, written under a temporary
name and renamed, so a reader never sees half a folder and two writers of one key both succeed. Each node
has its own cache: a worker on a new node tokenises once there.

Pure torch, no ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from elastic.core.tokenizer import TOKENIZER_FILES

VERSION = 1
# What tokenisation reads from a model folder: the tokenizer and the chat template, wherever it is saved.
KEY_FILES = (*TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json", "merges.txt",
             "chat_template.jinja", "chat_template.json")
TOKENISED = {"files": 0}  # data files this process tokenised (tests read it: a reshard must not add one)
_in_process: dict[str, TokenizedRows] = {}


@dataclass(frozen=True)
class TokenizedRows:
    ids: torch.Tensor  # int64, every row's ids back to back
    mask: torch.Tensor  # bool, the same length: which tokens carry loss
    offsets: torch.Tensor  # int64 [rows + 1]
    fmt: str  # the TRL format the rows were read in

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b], self.mask[a:b]


def cache_root() -> Path:
    return Path(os.environ.get("ELASTIC_CACHE_DIR") or Path.home() / ".cache" / "elastic").expanduser() / "tokenized"


def _stamp(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def cache_key(data: Path, tokenizer_folder: str) -> str:
    parts: list = [VERSION, _stamp(data)]
    if tokenizer_folder:
        folder = Path(tokenizer_folder)
        parts += [_stamp(folder / name) for name in dict.fromkeys(KEY_FILES) if (folder / name).is_file()]
    else:
        parts.append("bytes")
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def tokenized_rows(data: Path, tokenizer_folder: str,
                   tokenize: Callable[[], tuple[str, Sequence[tuple[list[int], list[bool]]]]]) -> TokenizedRows:
    """The rows of ``data``: from this process, else from the disk cache, else ``tokenize()`` (which returns
    the format and every row's (ids, mask)), written to the cache for the next build."""
    key = cache_key(data, tokenizer_folder)
    if key in _in_process:
        return _in_process[key]
    folder = cache_root() / key
    rows = _load(folder)
    if rows is None:
        fmt, samples = tokenize()
        TOKENISED["files"] += 1
        rows = _pack(fmt, samples)
        _store(folder, rows)
    _in_process[key] = rows
    return rows


def _pack(fmt: str, samples: Sequence[tuple[list[int], list[bool]]]) -> TokenizedRows:
    lengths = torch.tensor([len(ids) for ids, _ in samples], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    ids = torch.tensor([t for row, _ in samples for t in row], dtype=torch.long)
    mask = torch.tensor([m for _, row in samples for m in row], dtype=torch.bool)
    return TokenizedRows(ids, mask, offsets, fmt)


def _load(folder: Path) -> TokenizedRows | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        tensors = torch.load(folder / "rows.pt", mmap=True, weights_only=True)
    except (OSError, ValueError, RuntimeError):  # absent, or unreadable: tokenise again and rewrite it
        return None
    return TokenizedRows(tensors["ids"], tensors["mask"], tensors["offsets"], meta["format"])


def _store(folder: Path, rows: TokenizedRows) -> None:
    """Best effort: a cache that cannot be written costs the next build a tokenisation, nothing else."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        torch.save({"ids": rows.ids, "mask": rows.mask, "offsets": rows.offsets}, tmp / "rows.pt")
        (tmp / "meta.json").write_text(json.dumps({"format": rows.fmt, "rows": len(rows)}))
        try:
            tmp.rename(folder)
        except OSError:  # another process wrote the same key first: its copy is as good
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass


def forget_in_process() -> None:
    """Drop this process's copies (tests: the next build reads the disk cache)."""
    _in_process.clear()
