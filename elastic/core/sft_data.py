"""Datasets in TRL's formats, from local JSON, JSONL or Parquet files (read with ``datasets``).

One row per sample, in one of TRL's formats (``trl.data_utils``), detected from the columns:

- language modelling: ``text``; loss on every token;
- prompt-completion: ``prompt`` and ``completion`` (texts); loss on completion tokens only (TRL's
  ``completion_only_loss``);
- conversational: ``messages``, a list of ``{"role", "content"}`` rendered with the tokenizer's
  chat template; loss on assistant turns only (TRL's ``assistant_only_loss``).

As TRL does, a text sample gets the tokenizer's special tokens and an EOS at the end. Samples longer
than ``seq_len + 1`` tokens are truncated (TRL's ``max_length``) and counted in ``truncated``.

Assistant turns are found by rendering prefixes: the tokens of ``messages[:i]`` with the generation
prompt, then of ``messages[:i+1]``; what the second adds is turn ``i``. This needs a template whose
rendering of a prefix is a prefix of the whole (true of the Llama 3, Qwen2 and ChatML templates);
a template that breaks it is refused rather than masked wrongly.

Rows are tokenized once per job (``token_cache.py``: kept on disk and in the process, so a reshard, a
recovery or a new worker reads them instead of the file); the global-index sampler addresses them as any
other dataset. Pure Python and torch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from elastic.core.dataset import IGNORE, Dataset, held_out
from elastic.core.token_cache import tokenized_rows

log = logging.getLogger(__name__)

FORMATS = {"text": ("text",), "prompt-completion": ("prompt", "completion"), "conversational": ("messages",)}
LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def read_rows(path: Path) -> list[dict]:
    """The rows of a local JSON, JSONL or Parquet file, through ``datasets`` (no hub access)."""
    import datasets

    if path.suffix not in LOADERS:
        raise ValueError(f"{path}: unknown data file type {path.suffix!r}; use one of {sorted(LOADERS)}")
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(LOADERS[path.suffix], data_files=str(path), split="train")
    except Exception as err:  # datasets raises many types for a malformed file; all mean the same here
        raise ValueError(f"{path}: cannot be read as {LOADERS[path.suffix]} ({_first_bad_line(path) or err})") from err
    return table.to_list()


def _first_bad_line(path: Path) -> str | None:
    """Where a JSONL file stops being JSON (datasets' own error does not say)."""
    if path.suffix != ".jsonl":
        return None
    import json

    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {lineno} is not valid JSON: {err.msg}"
    return None


def detect_format(rows: list[dict], path: Path) -> str:
    columns = set(rows[0]) if rows else set()
    for name, needed in FORMATS.items():
        if set(needed) <= columns:
            return name
    wanted = " or ".join("+".join(f"'{c}'" for c in cols) for cols in FORMATS.values())
    raise ValueError(f"{path}: columns {sorted(columns)} fit no TRL dataset format; a row needs {wanted}")


def assistant_mask(tok, messages: list[dict], where: str) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and, per token, whether it belongs to an assistant turn."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not {"role", "content"} <= m.keys():
            raise ValueError(f"{where}: message {i} must be an object with 'role' and 'content', got {m!r}")
    ids = tok.chat_ids(messages)
    mask = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.chat_ids(messages[:i], add_generation_prompt=True)
        through = tok.chat_ids(messages[: i + 1])
        if ids[: len(before)] != before or ids[: len(through)] != through:
            raise ValueError(f"{where}: the chat template does not render a conversation's prefix as a prefix of "
                             "it, so assistant turns cannot be located; use a template without that property")
        mask[len(before): len(through)] = [True] * (len(through) - len(before))
    if not any(mask):
        raise ValueError(f"{where}: the conversation has no assistant turn, so no token would carry loss")
    return ids, mask


def tokenize_row(tok, row: dict, fmt: str, where: str) -> tuple[list[int], list[bool]]:
    """(ids, loss mask) of one row in format ``fmt``; the mask marks tokens that are targets."""
    if fmt == "text":
        ids = tok.encode(_text(row, "text", where), bos=True, eos=True)
        return ids, [True] * len(ids)
    if fmt == "prompt-completion":
        prompt = tok.encode(_text(row, "prompt", where), bos=True)
        completion = tok.encode(_text(row, "completion", where), eos=True)
        return prompt + completion, [False] * len(prompt) + [True] * len(completion)
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    return assistant_mask(tok, messages, where)


def _text(row: dict, key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


class RecordsDataset(Dataset):
    """A TRL-format file as (input_ids, labels) samples of ``seq_len`` tokens (see the module docstring)."""

    def __init__(self, path: Path, tok, seq_len: int, eval_fraction: float) -> None:
        self.path, self.seq_len, self.pad_id = path, seq_len, tok.pad_id

        def tokenize():
            rows = read_rows(path)
            if len(rows) < 2:
                raise ValueError(f"{path} has {len(rows)} rows; need at least 2")
            fmt = detect_format(rows, path)
            return fmt, [tokenize_row(tok, row, fmt, f"{path} row {i}") for i, row in enumerate(rows)]

        # Once per job: a reshard, a recovery or a new worker reads the tokenized rows, not the file.
        self.rows = tokenized_rows(path, str(getattr(tok, "folder", "")), tokenize)
        self.format, n_rows = self.rows.fmt, len(self.rows)
        lengths = self.rows.offsets.diff()
        self.truncated = int((lengths > seq_len + 1).sum())
        # A sample whose loss tokens all lie beyond the cut trains nothing; a batch of only such samples
        # would divide by zero target tokens.
        self.no_loss = sum(not bool(self.rows.row(i)[1][1: seq_len + 1].any()) for i in range(n_rows))
        if self.no_loss == n_rows:
            raise ValueError(f"{path}: truncated to data.seq_len={seq_len}, no sample keeps a token that carries "
                             f"loss (the {self.format} format's loss starts later); raise data.seq_len")
        if self.truncated:
            log.info("%s: %d of %d samples truncated to %d tokens (data.seq_len + 1), %d of them with no loss "
                     "token left", path, self.truncated, n_rows, seq_len + 1, self.no_loss)
        self.n_holdout = held_out(n_rows, eval_fraction)  # the last rows: never sampled for training
        self.n_train = n_rows - self.n_holdout

    def __len__(self) -> int:
        return self.n_train

    def holdout_size(self) -> int:
        return self.n_holdout

    def sample(self, index: int, split: str = "train"):
        ids, mask = self.rows.row(index if split == "train" else self.n_train + index)
        return pack(ids, mask, self.seq_len, self.pad_id)


def pack(ids: list[int], mask: list[bool], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token labels, right-padded or truncated to ``seq_len``: position t predicts token
    t+1, with loss only where token t+1 is marked. Right padding comes after every real token."""
    ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
    n = len(ids)
    tokens = torch.full((seq_len + 1,), pad_id, dtype=torch.long)
    tokens[:n] = torch.as_tensor(ids, dtype=torch.long)
    keep = torch.zeros(seq_len + 1, dtype=torch.bool)
    keep[:n] = torch.as_tensor(mask, dtype=torch.bool)
    labels = torch.where(keep[1:], tokens[1:], torch.full((seq_len,), IGNORE, dtype=torch.long))
    return tokens[:-1], labels
