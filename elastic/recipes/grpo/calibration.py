"""Rate groups and the gold-labelled calibration set that GRPO's flip rates are estimated from.

``grpo.rate_group`` puts each prompt in a group: a column of the prompt rows (a built-in task's
rows carry ``task``) or a function ``pkg.mod:fn(row) -> str``. With ``estimate_rates`` the rates of
each group are measured once, before training, on a calibration set of (prompt, completion, gold
label) triples:

- ``grpo.calibration``: a file with ``prompt``, ``completion``, ``label`` (0/1, e.g. from people
  who checked the verifier's outputs) and the group column. This is the honest choice with a real
  verifier: its rates are a property of the policy's outputs, so label the policy's own samples.
- otherwise, ``calibration_size`` synthetic candidates for held-out prompts: the answer itself, a
  well-formed variant of it (surrounding whitespace), a near miss (the last character changed) or
  a wrong answer, one kind per sample by a seeded hash. Their gold label is exact-match
  ``accuracy`` against the row's ``answer`` (the dataset's answer, not the verifier). The estimates
  then describe this candidate mix, not the policy's outputs; say so when quoting them.

The observed label is the simulated channel's flip of the gold label (``inject_noise``), or the
run's own reward functions on the completion (a real verifier, ``inject_noise=False``), which must
return 0 or 1 there. Pure Python and torch.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import torch

from elastic.core.seeds import stable_seed
from elastic.core.sft_data import read_rows
from elastic.recipes.grpo.noise import RewardNoise
from elastic.recipes.grpo.prompts import PromptTask, RewardFuncs, score_batch
from elastic.recipes.grpo.rates import GroupEstimate, RateTable, estimate_rates
from elastic.recipes.grpo.rewards import accuracy, import_function

KINDS = ("right", "variant", "near_miss", "wrong")


def group_function(spec: str, columns: list[str], where: str) -> Callable[[dict], str]:
    """Row -> rate group: a column name, an import path 'pkg.mod:fn', or empty (one group, "")."""
    if not spec:
        return lambda row: ""
    if ":" in spec:
        fn = import_function(spec)
        return lambda row: str(fn(row))
    if spec not in columns:
        raise ValueError(f"grpo.rate_group={spec!r} is not a column of {where} (columns {sorted(columns)}); name "
                         "one of them, or a function 'package.module:function' taking a row")
    return lambda row: str(row[spec])


def candidate(answer: str, kind: str, rng: random.Random) -> str:
    """A completion of the given kind for a prompt whose answer is ``answer`` (see the module docstring)."""
    if kind == "right":
        return answer
    if kind == "variant":
        return rng.choice((" ", "")) + answer + rng.choice((" ", "\n"))
    if kind == "near_miss":
        last = answer[-1:] or "0"
        swap = str((int(last) + rng.randint(1, 9)) % 10) if last.isdigit() else "x"
        return answer[:-1] + swap
    if answer.lstrip("-").isdigit():
        return str(int(answer) + rng.choice((-1, 1)) * rng.randint(10, 99))
    return answer[::-1] + "?"


def synthetic_set(task: PromptTask, size: int, seed: int) -> list[dict]:
    """``size`` calibration rows from the held-out prompts: prompt, completion, gold label, columns."""
    if not task.holdout_size():
        raise ValueError(f"grpo.estimate_rates needs labelled samples to calibrate on, and {task.where} has no "
                         "held-out prompts; pass a gold-labelled file with grpo.calibration, or give the rates "
                         "with grpo.rho_plus/rho_minus (or grpo.group_rates)")
    rows = []
    for n in range(size):
        i = n % task.holdout_size()
        row = dict(task.holdout[i])
        rng = random.Random(stable_seed(seed, "calibration", n))
        completion = candidate(str(row["answer"]), rng.choice(KINDS), rng)
        row["completion"] = completion
        row["label"] = accuracy([row["prompt"]], [completion], [row["answer"]])[0]
        rows.append(row)
    return rows


def file_set(path: str) -> list[dict]:
    """The rows of a gold-labelled calibration file, checked for the columns calibration needs."""
    rows = read_rows(Path(path))
    missing = {"prompt", "completion", "label"} - set(rows[0])
    if missing:
        raise ValueError(f"grpo.calibration={path!r}: columns {sorted(rows[0])} lack {sorted(missing)}; a "
                         "calibration row is a prompt, a completion and its gold label (0 or 1)")
    return rows


def calibrate(rows: list[dict], group_of: Callable[[dict], str], funcs: RewardFuncs, weights: list[float],
              noise: RewardNoise | None, table: RateTable, tok, min_per_class: int
              ) -> tuple[RateTable, list[GroupEstimate]]:
    """Per-group rates from labelled ``rows``: observed by the channel (``noise``, at ``table``'s rates) or
    by the reward functions (a real verifier)."""
    gold = torch.tensor([float(r["label"]) for r in rows], dtype=torch.float64)
    groups = [group_of(r) for r in rows]
    if noise is not None:
        observed = noise.observe(gold, list(range(len(rows))), [0] * len(rows), split="calibration",
                                 rates=table.rows(groups))
    else:
        extra = [k for k in rows[0] if k not in ("prompt", "completion", "label")]
        columns = {c: [r[c] for r in rows] for c in extra}
        completions = [str(r["completion"]) for r in rows]
        observed = score_batch(funcs, [r["prompt"] for r in rows], completions, columns,
                               [tok.encode(c) for c in completions], weights)
    return estimate_rates(gold, observed, groups, min_per_class)
