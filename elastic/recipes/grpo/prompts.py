"""GRPO's prompts and rewards: a JSON/JSONL/Parquet file of TRL's prompt-only format, or a built-in
task as the same kind of rows, scored by TRL-style reward functions.

A row has ``prompt`` (a text, or a conversation: a list of ``{"role", "content"}`` rendered with the
tokenizer's chat template and its generation prompt), plus any extra columns (``answer``, ...).
Prompts are tokenized once and left-padded to one fixed width, the longest prompt of the file, so a
row's tensors never depend on its batch-mates; the mask tells the model which tokens are real
(``elastic.model.llama.Padding``).

Reward functions follow TRL's ``reward_funcs`` convention:
``fn(prompts: list, completions: list[str], **columns) -> list[float | None]``, called once per
batch with every extra column as a keyword list (and ``completion_ids``); completions of a
conversational prompt come as TRL gives them, ``[{"role": "assistant", "content": ...}]``, and an
``async def`` function is awaited (``reward_calls.py``). The rewards of several
functions add up, times ``reward_weights``; ``None`` means "does not apply" and is skipped, as TRL's
nansum does; a completion that every function scores None is unscorable (NaN) and gets advantage 0, as in
TRL's ``GRPOTrainer``. A built-in task (``arithmetic``, ``sort_digits``) is rows ``{"prompt", "answer"}`` with
a disjoint holdout, scored by default by ``rewards.accuracy``: the same path as a user's file. Pure
Python and torch.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from elastic.core.data import Problem
from elastic.core.sft_data import read_rows
from elastic.core.tokenizer import ByteTokenizer
from elastic.recipes.grpo.reward_calls import call_reward
from elastic.recipes.grpo.rewards import RewardFn, accuracy, build_task, import_function, resolve_reward, score_one

log = logging.getLogger("elastic")

DEFAULT_REWARD = "elastic.recipes.grpo.rewards:accuracy"
MIXED = ("arithmetic", "sort_digits")  # the built-in task "mixed" interleaves these

RewardFuncs = list[tuple[str, Callable]]


class PromptTask:
    """A prompt set addressed by global index like any dataset: a file's rows, or a built-in task's.

    ``rows`` is a sequence of dicts with ``prompt`` and any extra columns; ``holdout`` (possibly empty)
    holds rows disjoint from them, for evaluation and for calibrating reward-noise rates. ``width`` is
    the left-padded prompt width; None measures it over every row (a built-in task whose prompts have
    one known length passes it, so that 50,000 lazily generated rows are not all tokenized up front).
    """

    def __init__(self, rows: Sequence[dict], tok, max_new_tokens: int, max_seq_len: int, where: str,
                 holdout: Sequence[dict] = (), width: int | None = None) -> None:
        if len(rows) < 2:
            raise ValueError(f"{where} has {len(rows)} rows; need at least 2 prompts")
        if "prompt" not in rows[0]:
            raise ValueError(f"{where}: columns {sorted(rows[0])} lack 'prompt', which TRL's prompt-only format "
                             "needs (a text, or a list of {role, content} messages)")
        self.tok, self.rows, self.holdout, self.where = tok, rows, holdout, where
        self._ids: dict[tuple[str, int], list[int]] = {}
        if width is None:
            lengths = [len(self.ids(i)) for i in range(len(rows))] + [len(self.ids(i, "holdout"))
                                                                       for i in range(len(holdout))]
            width, longest = max(lengths), max(range(len(lengths)), key=lengths.__getitem__)
        else:
            longest = 0
        self.width = width
        if self.width + max_new_tokens > max_seq_len:
            raise ValueError(f"{where} row {longest}: its prompt has {self.width} tokens, and with max_new_tokens="
                             f"{max_new_tokens} that exceeds the model's max_position_embeddings={max_seq_len}; "
                             "shorten the prompt or lower grpo.max_new_tokens")
        self.columns = [k for k in rows[0] if k != "prompt"]
        self.n = len(rows)

    @classmethod
    def from_file(cls, path: str | Path, tok, max_new_tokens: int, max_seq_len: int) -> PromptTask:
        """The rows of a JSON/JSONL/Parquet file of TRL's prompt-only format (no holdout split)."""
        return cls(read_rows(Path(path)), tok, max_new_tokens, max_seq_len, str(path))

    @classmethod
    def builtin(cls, name: str, seq_len: int, num_samples: int, seed: int, tok, max_new_tokens: int,
                max_seq_len: int) -> PromptTask:
        """A built-in task as an ordinary prompt set: rows ``{"prompt", "answer", "task"}`` and a disjoint
        holdout, scored by the same reward functions as a file (by default ``rewards.accuracy``).
        ``"mixed"`` interleaves the built-in tasks (row i is task i mod 2), e.g. for per-task rate groups."""
        names = MIXED if name == "mixed" else (name,)
        tasks = [build_task(n, seq_len, num_samples, seed) for n in names]
        # The byte tokenizer turns a fixed-length prompt into BOS + its bytes; any other tokenizer is measured.
        width = (max(1 + len(t.problem(0).prompt) for t in tasks) if isinstance(tok, ByteTokenizer) else None)
        return cls(TaskRows(tasks, names, "train"), tok, max_new_tokens, max_seq_len, f"the built-in task {name!r}",
                   holdout=TaskRows(tasks, names, "holdout"), width=width)

    def ids(self, index: int, split: str = "train") -> list[int]:
        """The row's prompt tokens, unpadded (cached)."""
        key = (split, index)
        if key not in self._ids:
            self._ids[key] = self._encode(self.row(index, split)["prompt"], f"{self.where} {split} row {index}")
        return self._ids[key]

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
        return len(self.holdout)

    def prompt_ids(self, index: int, split: str = "train") -> list[int]:
        ids = self.ids(index, split)
        if len(ids) > self.width:
            raise ValueError(f"{self.where} {split} row {index} has {len(ids)} prompt tokens, more than the "
                             f"built-in task's width {self.width}")
        return [self.tok.pad_id] * (self.width - len(ids)) + ids

    def prompt_mask(self, index: int, split: str = "train") -> list[bool]:
        n = len(self.ids(index, split))
        return [False] * (self.width - n) + [True] * n

    def row(self, index: int, split: str = "train") -> dict:
        """The row as the file holds it: ``prompt`` (a text or messages, as TRL hands it to reward functions)
        and the extra columns. A built-in task's row is generated on each call."""
        return (self.rows if split == "train" else self.holdout)[index]

    def problem(self, index: int, split: str = "train") -> Problem:
        row = self.row(index, split)
        prompt = row["prompt"]
        return Problem(prompt if isinstance(prompt, str) else str(prompt), str(row.get("answer", "")))


class TaskRows(Sequence):
    """Built-in tasks' problems as rows ``{"prompt", "answer", "task"}``, generated on demand
    (deterministic); with several tasks, row i is task ``i % len(tasks)``'s problem ``i // len(tasks)``."""

    def __init__(self, tasks: list, names: tuple[str, ...], split: str) -> None:
        self.tasks, self.names, self.split = tasks, names, split

    def __len__(self) -> int:
        return min(len(t) if self.split == "train" else t.holdout_size() for t in self.tasks) * len(self.tasks)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        which, local = index % len(self.tasks), index // len(self.tasks)
        problem = self.tasks[which].problem(local, self.split)
        return {"prompt": problem.prompt, "answer": problem.answer, "task": self.names[which]}


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


def pairwise(fn: RewardFn) -> Callable:
    """A one-(prompt, completion) reward ``fn(prompt, completion) -> float`` (``grpo.reward_fn``) as a
    TRL-style batch function, so that every reward goes through ``score_batch``; a failure names the row."""

    def batch(prompts, completions, **columns) -> list[float]:
        return [score_one(fn, p, c) for p, c in zip(prompts, completions, strict=True)]

    batch.checked = True  # score_one's errors already name the function and the row
    return batch


def reward_functions(reward_funcs: str, reward_fn: str) -> RewardFuncs:
    """The run's reward functions: ``reward_funcs`` (TRL's batch convention), else the one-pair
    ``reward_fn``, else exact-match ``accuracy`` on the ``answer`` column (what the built-in tasks use)."""
    if reward_funcs:
        return resolve_reward_funcs(reward_funcs)
    if reward_fn:
        return [(reward_fn, pairwise(resolve_reward(reward_fn)))]
    return [(DEFAULT_REWARD, accuracy)]


def parse_weights(spec: str, n: int) -> list[float]:
    """TRL's ``reward_weights``: one weight per reward function, all 1.0 when empty."""
    if not spec:
        return [1.0] * n
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise ValueError(f"grpo.reward_weights={spec!r} must be comma-separated numbers, e.g. '1.0,0.5'") from None
    if len(weights) != n or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"grpo.reward_weights={spec!r} has {len(weights)} finite weights for {n} reward "
                         "functions; give exactly one per function in grpo.reward_funcs")
    return weights


def score_batch(funcs: RewardFuncs, prompts: Sequence, completions: Sequence[str],
                columns: dict[str, list], completion_ids: list[list[int]],
                weights: Sequence[float] | None = None, per_func: list | None = None) -> torch.Tensor:
    """``per_func``, when given, receives each function's own values (None as NaN), for TRL's
    ``rewards/<func>/mean`` (``report.py``).

    Rewards [N] (float64): each function called once on the whole batch (TRL's convention); their
    values times ``weights`` summed, a None skipped (TRL's ``nansum``); NaN where every function returned None
    (TRL's unscorable completion: ``advantage.py`` gives it advantage 0)."""
    total = torch.zeros(len(completions), dtype=torch.float64)
    seen = torch.zeros(len(completions), dtype=torch.bool)
    for (name, fn), weight in zip(funcs, weights or [1.0] * len(funcs), strict=True):
        try:
            values = call_reward(fn, prompts, completions, completion_ids, columns)  # TRL's shapes, async too
        except Exception as err:  # a user function may raise anything; name it and the batch
            if getattr(fn, "checked", False):
                raise
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
            total[i] += weight * float(value)
            seen[i] = True
        if per_func is not None:
            per_func.append([math.nan if value is None else float(value) for value in values])
    if not seen.all():  # TRL: unscorable, kept out of its group's mean and std and given advantage 0
        i = int((~seen).nonzero()[0])
        log.warning("every reward function returned None for %d completion(s), e.g. completion %d (%r) of prompt %r; "
                    "they get advantage 0, as in TRL", int((~seen).sum()), i, completions[i], prompts[i])
    return torch.where(seen, total, torch.full_like(total, torch.nan))
