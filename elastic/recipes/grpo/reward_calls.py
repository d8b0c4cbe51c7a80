"""How a reward function is called, in TRL's conventions: completions shaped like their prompts, coroutines run.

TRL's ``GRPOTrainer`` hands reward functions the completions as texts when the prompts are texts, and
as conversations, ``[{"role": "assistant", "content": text}]``, when the prompts are conversations
(``prompts.py``: a prompt is a text or a list of messages). A file may mix both, so the shape follows
each row's prompt; for a file of one kind that is TRL's rule. A reward function may be ``async def``
(TRL awaits those on an event loop): its coroutine is run to completion here, on a fresh loop.

Our own verifiers (``rewards.py``) and the one-pair wrapper (``prompts.pairwise``) compare texts, so
they are handed texts whatever the prompt. Pure Python.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# Modules whose reward functions take completions as texts (our verifiers, and prompts.pairwise's wrapper).
TEXT_MODULES = ("elastic.recipes.grpo.rewards", "elastic.recipes.grpo.prompts")


def as_messages(prompts: Sequence, completions: Sequence[str]) -> list:
    """Each completion as TRL gives it: a one-message conversation after a conversational prompt, else text."""
    return [[{"role": "assistant", "content": c}] if isinstance(p, list) else c
            for p, c in zip(prompts, completions, strict=True)]


def takes_text(fn: Callable) -> bool:
    return getattr(fn, "__module__", None) in TEXT_MODULES


def settle(value: Any) -> Any:
    """``value``, or what it resolves to when a reward function returned an awaitable (an ``async def``)."""
    if not inspect.isawaitable(value):
        return value

    async def wait() -> Any:
        return await value

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop in this thread: the usual case, in a worker's task
        return asyncio.run(wait())
    with ThreadPoolExecutor(1) as pool:  # this thread already runs a loop, which must not be re-entered
        return pool.submit(asyncio.run, wait()).result()


def call_reward(fn: Callable, prompts: Sequence, completions: Sequence[str], completion_ids: list[list[int]],
                columns: dict[str, list]) -> Any:
    """``fn``'s values for a batch, called as TRL calls it (keywords; completions shaped like the prompts)."""
    shaped = list(completions) if takes_text(fn) else as_messages(prompts, completions)
    return settle(fn(prompts=list(prompts), completions=shaped, completion_ids=completion_ids, **columns))
