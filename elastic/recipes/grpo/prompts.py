"""GRPO on users' prompts: a JSON/JSONL/Parquet file of TRL's prompt-only format, and TRL-style
reward functions.

A row has ``prompt`` (a text, or a conversation: a list of ``{"role", "content"}`` rendered with the
tokenizer's chat template and its generation prompt), plus any extra columns (``answer``, ...).
Prompts are tokenized once and left-padded to one fixed width, the longest prompt of the file, so a
row's tensors never depend on its batch-mates; the mask tells the model which tokens are real
(``elastic.model.llama.Padding``).

Reward functions follow TRL's ``reward_funcs`` convention:
``fn(prompts: list, completions: list[str], **columns) -> list[float | None]``, called once per
batch with every extra column as a keyword list (and ``completion_ids``). The rewards of several
functions add up; ``None`` means "does not apply" and is skipped, as TRL's nansum does. Pure
Python and torch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from elastic.core.data import Problem
from elastic.core.sft_data import read_rows
from elastic.recipes.grpo.rewards import import_function

RewardFuncs = list[tuple[str, Callable]]


class PromptTask:
    """The prompts of a file, addressed by global index like any dataset (see the module docstring)."""

    def __init__(self, path: str | Path, tok, max_new_tokens: int, max_seq_len: int) -> None:
        self.path = path = Path(path)
        rows = read_rows(path)
        if len(rows) < 2:
            raise ValueError(f"{path} has {len(rows)} rows; need at least 2 prompts")
        if "prompt" not in rows[0]:
            raise ValueError(f"{path}: columns {sorted(rows[0])} lack 'prompt', which TRL's prompt-only format "
                             "needs (a text, or a list of {role, content} messages)")
        self.tok, self.rows = tok, rows
        self.ids = [self._encode(row["prompt"], f"{path} row {i}") for i, row in enumerate(rows)]
        self.width = max(len(ids) for ids in self.ids)
        longest = max(range(len(rows)), key=lambda i: len(self.ids[i]))
        if self.width + max_new_tokens > max_seq_len:
            raise ValueError(f"{path} row {longest}: its prompt has {self.width} tokens, and with max_new_tokens="
                             f"{max_new_tokens} that exceeds the model's max_position_embeddings={max_seq_len}; "
                             "shorten the prompt or lower grpo.max_new_tokens")
        self.columns = [k for k in rows[0] if k != "prompt"]
        self.n = len(rows)

    def _encode(self, prompt, where: str) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tok.encode(prompt, bos=True)
        elif isinstance(prompt, list):
            ids = self.tok.chat_ids(prompt, add_generation_prompt=True)
        else:
            raise ValueError(f"{where}: 'prompt' must be a text or a list of messages, got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"{where}: the prompt is empty")
        return ids

    def __len__(self) -> int:
        return self.n

    def holdout_size(self) -> int:
        return 0

    def prompt_ids(self, index: int, split: str = "train") -> list[int]:
        ids = self.ids[index]
        return [self.tok.pad_id] * (self.width - len(ids)) + ids

    def prompt_mask(self, index: int) -> list[bool]:
        n = len(self.ids[index])
        return [False] * (self.width - n) + [True] * n

    def problem(self, index: int, split: str = "train") -> Problem:
        prompt = self.rows[index]["prompt"]
        return Problem(prompt if isinstance(prompt, str) else str(prompt), str(self.rows[index].get("answer", "")))

    def prompt(self, index: int):
        """The row's prompt as the file holds it (a text or messages), as TRL hands it to reward functions."""
        return self.rows[index]["prompt"]

    def column(self, name: str, index: int):
        return self.rows[index][name]


def resolve_reward_funcs(spec: str) -> RewardFuncs:
    """``"pkg.mod:fn,pkg.mod:other"`` as (name, function) pairs; an import failure is one clear error."""
    funcs = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        module_name, sep, attr = item.partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(f"grpo.reward_funcs entry {item!r} is not an import path 'package.module:function'")
        funcs.append((item, import_function(item)))
    if not funcs:
        raise ValueError("grpo.reward_funcs is empty; name at least one 'package.module:function'")
    return funcs


def score_batch(funcs: RewardFuncs, prompts: Sequence, completions: Sequence[str],
                columns: dict[str, list], completion_ids: list[list[int]]) -> torch.Tensor:
    """Rewards [N] (float64): each function called once on the whole batch (TRL's convention), summed."""
    total = torch.zeros(len(completions), dtype=torch.float64)
    seen = torch.zeros(len(completions), dtype=torch.bool)
    for name, fn in funcs:
        try:
            values = fn(prompts=list(prompts), completions=list(completions), completion_ids=completion_ids,
                        **columns)
        except Exception as err:  # a user function may raise anything; name it and the batch
            raise ValueError(f"reward function {name} raised {type(err).__name__}: {err} (first prompt "
                             f"{prompts[0]!r}); fix it so that it returns one float or None per completion") from err
        if not isinstance(values, Sequence) or len(values) != len(completions):
            got = len(values) if isinstance(values, Sequence) else type(values).__name__
            raise ValueError(f"reward function {name} returned {got} for {len(completions)} completions; it must "
                             "return a list with one float (or None) per completion")
        for i, value in enumerate(values):
            if value is None:
                continue
            if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
                raise ValueError(f"reward function {name} returned {value!r} for completion {i} "
                                 f"({completions[i]!r}); rewards must be finite numbers or None")
            total[i] += float(value)
            seen[i] = True
    if not seen.all():
        i = int((~seen).nonzero()[0])
        raise ValueError(f"every reward function returned None for completion {i} ({completions[i]!r}); at least "
                         "one must score each completion")
    return total
