"""Verifiable 0/1 rewards: built-in exact-answer tasks and checked user callables.

Every reward function has the signature ``fn(prompt: str, completion: str) -> float``: the prompt
text without BOS, and the completion text as decoded by the byte tokenizer (which stops at the
first EOS). The built-in tasks recompute the exact answer from the prompt itself, so a reward needs
no side channel to the dataset and any worker can score any sample.

Built-in tasks (deterministic per (seed, index), fixed-length prompts, train and holdout problems
disjoint by a hash of the problem, like ``elastic.core.data.ArithmeticTask``):
- ``arithmetic``: "47+38=" -> "85" (``elastic.core.data.ArithmeticTask``);
- ``sort_digits``: "sort 83152=" -> "12358" (``SortDigitsTask`` below).

``score_one`` runs a one-pair reward function and turns a crash, a non-number or a NaN into a
ValueError naming the prompt, so a bad user function fails on its first sample with a clear message
(None passes: it means "does not apply", as in TRL).
The built-in tasks reach GRPO as ordinary prompt rows (``prompts.PromptTask.builtin``), scored by
``accuracy`` against their ``answer`` column.
"""

from __future__ import annotations

import importlib
import math
import numbers
import random
import re
from collections.abc import Callable, Sequence

import torch

from elastic.core.data import ArithmeticTask, Dataset, ExactAnswerTask, Problem
from elastic.core.seeds import stable_seed
from elastic.core.tokenizer import ByteTokenizer

RewardFn = Callable[[str, str], float]


def completion_text(ids: Sequence[int] | torch.Tensor) -> str:
    """The text of sampled completion tokens, up to (not including) the first EOS; PAD/BOS dropped."""
    return ByteTokenizer().decode(ids, stop_at_eos=True)


def extract_answer(completion: str) -> str:
    """The answer part of a completion: cut at the first newline, surrounding whitespace stripped.

    (The first EOS already ended the text in ``completion_text``.) Anything after the answer on the
    same line counts against it: the comparison is exact.
    """
    return completion.split("\n", 1)[0].strip()


def exact_match(completion: str, answer: str) -> float:
    """1.0 when the completion's answer equals ``answer`` exactly, else 0.0."""
    return 1.0 if extract_answer(completion) == answer.strip() else 0.0


def accuracy(prompts, completions, answer, **kwargs) -> list[float]:
    """A TRL-style reward function (``grpo.reward_funcs``) for prompt files with an ``answer`` column: 1.0
    when a completion's answer (its first line) equals the row's answer exactly, else 0.0."""
    return [exact_match(c, str(a)) for c, a in zip(completions, answer, strict=True)]


def lenient_accuracy(prompts, completions, answer, **kwargs) -> list[float]:
    """A verifier whose false positives fall on near misses, as a lenient grader's do: it also accepts an
    answer of the right length that matches in all but its last character ("85" for "86")."""
    out = []
    for c, a in zip(completions, answer, strict=True):
        got, want = extract_answer(c), str(a).strip()
        out.append(1.0 if got == want or (len(got) == len(want) > 1 and got[:-1] == want[:-1]) else 0.0)
    return out


def strict_accuracy(prompts, completions, answer, **kwargs) -> list[float]:
    """A verifier whose false negatives fall on well-formed variants, as a brittle parser's do: it rejects a
    correct answer with surrounding whitespace or text after it ("85 ", " 85", "85\n..."), which exact-match
    ``accuracy`` (the gold grader) accepts."""
    return [1.0 if c == str(a) else 0.0 for c, a in zip(completions, answer, strict=True)]


_ARITH = re.compile(r"(\d+)([+-])(\d+)=")


def arithmetic_answer(prompt: str) -> str:
    """The exact answer of an ``ArithmeticTask`` prompt such as "47+38=" (BOS-free text)."""
    match = _ARITH.fullmatch(prompt)
    if match is None:
        raise ValueError(f"prompt {prompt!r} is not an arithmetic problem of the form 'a+b=' or 'a-b='")
    a, op, b = int(match[1]), match[2], int(match[3])
    return str(a + b if op == "+" else a - b)


def arithmetic_reward(prompt: str, completion: str) -> float:
    """Exact-answer reward for the ``arithmetic`` task."""
    return exact_match(completion, arithmetic_answer(prompt))


class SortDigitsTask(ExactAnswerTask):
    """'sort 83152=' -> '12358': sort a fixed number of random digits; the completion is the answer then EOS.

    All prompts have the same length (BOS + "sort " + digits + "="), so a batch needs no padding.
    A problem is held out when a hash of its digit string says so (one in eight), so held-out
    problems never appear in training, whatever the seed.
    """

    name = "sort_digits"
    PREFIX = "sort "

    def __init__(self, seq_len: int, num_samples: int, seed: int = 0, holdout: int = 512,
                 num_digits: int = 5) -> None:
        if not 2 <= num_digits <= 12:
            raise ValueError(f"sort_digits num_digits={num_digits} must lie in [2, 12]")
        self.num_digits = num_digits
        self.prompt_len = 1 + len(self.PREFIX) + num_digits + 1  # BOS + "sort " + digits + "="
        if seq_len < self.prompt_len + num_digits:
            raise ValueError(f"sort_digits with {num_digits} digits needs seq_len >= {self.prompt_len + num_digits} "
                             f"(prompt {self.prompt_len} + answer and EOS), got {seq_len}")
        super().__init__(seq_len, num_samples, seed, holdout)

    @staticmethod
    def _is_holdout(digits: str) -> bool:
        return stable_seed("sort-split", digits) % 8 == 0

    def problem(self, index: int, split: str = "train") -> Problem:
        rng = random.Random(stable_seed(self.seed, "sort", self.num_digits, split, index))
        while True:
            digits = "".join(rng.choice("0123456789") for _ in range(self.num_digits))
            if self._is_holdout(digits) == (split != "train"):
                break
        return Problem(f"{self.PREFIX}{digits}=", "".join(sorted(digits)))


_SORT = re.compile(r"sort (\d+)=")


def sort_digits_reward(prompt: str, completion: str) -> float:
    """Exact-answer reward for the ``sort_digits`` task."""
    match = _SORT.fullmatch(prompt)
    if match is None:
        raise ValueError(f"prompt {prompt!r} is not a sort_digits problem of the form 'sort 83152='")
    return exact_match(completion, "".join(sorted(match[1])))


TASKS: dict[str, tuple[type[Dataset], RewardFn]] = {
    "arithmetic": (ArithmeticTask, arithmetic_reward),
    "sort_digits": (SortDigitsTask, sort_digits_reward),
}


def build_task(name: str, seq_len: int, num_samples: int, seed: int) -> Dataset:
    """The prompt dataset of a built-in task."""
    if name not in TASKS:
        raise ValueError(f"task {name!r} is not a built-in reward task; choose one of {sorted(TASKS)}")
    return TASKS[name][0](seq_len, num_samples, seed)


def resolve_reward(spec: str | RewardFn) -> RewardFn:
    """A reward function from a callable, a built-in task name, or an import path 'package.module:function'."""
    if callable(spec):
        return spec
    if spec in TASKS:
        return TASKS[spec][1]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward {spec!r} is neither a built-in task ({', '.join(sorted(TASKS))}) nor an import "
                         "path 'package.module:function'")
    return import_function(spec)


def import_function(spec: str) -> Callable:
    """The function at import path 'package.module:function', or one ValueError naming it."""
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load reward function {spec!r}: {err}; check that the module is importable on "
                         "the driver and the workers (e.g. in the job's working directory)") from err
    if not callable(fn):
        raise ValueError(f"reward {spec!r} is a {type(fn).__name__}, not a function")
    return fn


def _name(fn: RewardFn) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def score_one(fn: RewardFn, prompt: str, completion: str) -> float | None:
    """``fn(prompt, completion)`` as a float, or None ("does not apply", as TRL's reward functions may return);
    any failure becomes a ValueError naming the prompt."""
    try:
        value = fn(prompt, completion)
    except Exception as err:  # a user function may raise anything; report which sample broke it
        raise ValueError(f"reward function {_name(fn)} raised {type(err).__name__}: {err} on prompt {prompt!r} "
                         f"(completion {completion!r}); fix the function so that it returns a float for "
                         "every completion, e.g. 0.0 for malformed ones") from err
    if value is None:  # "does not apply", as in TRL; a completion no function scores gets advantage 0
        return None
    if not isinstance(value, numbers.Real):
        raise ValueError(f"reward function {_name(fn)} returned {value!r} ({type(value).__name__}) for prompt "
                         f"{prompt!r} (completion {completion!r}); it must return a float such as 0.0 or 1.0")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"reward function {_name(fn)} returned {value!r} for prompt {prompt!r} "
                         f"(completion {completion!r}); rewards must be finite numbers")
    return value
