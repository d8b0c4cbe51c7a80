"""GRPO's evaluation during training (``train.eval_every``; ``control/evaluation.py``): TRL's ``eval_reward`` and
the rest of its rollout metrics with the ``eval_`` prefix, from one greedy completion per held-out prompt,
scored by the run's reward functions without noise (the true reward).

Held-out prompts: the built-in task's held-out problems (disjoint from training), or every row of
``grpo.eval_prompts`` (a file in TRL's prompt-only format); a prompt file with neither is refused at start.
Greedy sampling needs the whole policy on every worker, as a rollout does, so it runs on a data-parallel
layout only; on another layout ``eval_reward`` answers why, and the controller evaluates at the next step
boundary that has one (the rollout phase's), provided no optimizer step came between. Each data-parallel rank
samples its balanced share of the prompts (``EvalRollout``); the driver scores the whole set, so the metrics
do not depend on the layout. Sampling moves no data cursor and no random state (greedy), so training is the
same with and without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from elastic.control.workload import JobView
from elastic.recipes.grpo.config import GRPOConfig
from elastic.recipes.grpo.loop import GRPOLoop
from elastic.recipes.grpo.prompts import PromptTask, score_batch
from elastic.recipes.grpo.report import display_names, rollout_metrics
from elastic.recipes.grpo.worker import rollout
from elastic.runtime.tasks import TaskContext


@dataclass(frozen=True)
class EvalRollout:
    """One greedy completion for each (global prompt index, token ids, real-token mask) of ``prompts``."""

    prompts: list

    def run(self, ctx: TaskContext) -> dict:
        g = GRPOConfig.of(ctx.engine.cfg)
        greedy = SimpleNamespace(num_generations=1, max_new_tokens=g.max_new_tokens, temperature=0.0, top_p=1.0,
                                 num_iterations=1, beta=0.0)
        return rollout(ctx.engine, self.prompts, greedy, -1, ctx.scratch)


class HeldOutPrompts:
    """The prompts ``eval_reward`` samples, and how it scores them (see the module docstring)."""

    def __init__(self, loop: GRPOLoop) -> None:
        g, self.loop = loop.grpo, loop
        if g.eval_prompts:
            self.task = PromptTask.from_file(g.eval_prompts, loop.tok, g.max_new_tokens, loop.cfg.model.max_seq_len)
            self.split, self.n = "train", len(self.task)
        else:
            self.task, self.split, self.n = loop.task, "holdout", loop.task.holdout_size()
        if not self.n:
            raise ValueError(f"train.eval_every={loop.cfg.train.eval_every}: {loop.task.where} has no held-out "
                             "prompts; give grpo.eval_prompts FILE (TRL's prompt-only format)")

    def items(self) -> list[tuple[int, list[int], list[bool]]]:
        return [(i, self.task.prompt_ids(i, self.split), self.task.prompt_mask(i, self.split)) for i in range(self.n)]

    def metrics(self, tokens: torch.Tensor, lengths: torch.Tensor) -> dict[str, float]:
        """TRL's eval metrics of the completions ``tokens`` [n, C] (``lengths`` [n]) of every held-out prompt."""
        loop = self.loop
        rows = [self.task.row(i, self.split) for i in range(self.n)]
        ids = [tokens[r, : int(lengths[r])].tolist() for r in range(self.n)]
        per_func: list = []
        rewards = score_batch(loop.reward_funcs, [row["prompt"] for row in rows], [loop.tok.decode(t) for t in ids],
                              {c: [row.get(c) for row in rows] for c in self.task.columns}, ids, loop.reward_weights,
                              per_func)
        truncated = tokens[torch.arange(self.n), lengths - 1] != loop.tok.eos_id
        names = display_names([name for name, _ in loop.reward_funcs])
        out = rollout_metrics(torch.tensor(per_func, dtype=torch.float64).T, names, rewards, lengths, truncated)
        return {f"eval_{k}": v for k, v in out.items()} | {"eval_samples": self.n}


def eval_reward(held: HeldOutPrompts, job: JobView) -> dict[str, float] | str:
    """TRL's eval metrics of the current policy (``eval_reward`` ...), or why this layout cannot sample them."""
    placement = job.group.placement
    layout = placement.layout
    if (layout.fsdp, layout.tp, layout.pp) != (1, 1, 1):
        return f"greedy sampling needs the whole policy on every worker (a data-parallel layout), not {layout}"
    items = held.items()
    tasks = {w: EvalRollout(held.loop.share(items, layout.data_index(r), layout.data_parallel))
             for r, w in enumerate(placement.workers)}
    out = job.group.run(tasks)
    parts = [out[w] for w in placement.workers if out[w]["prompts"]]  # dp-only: rank order is data order
    if [i for part in parts for i in part["prompts"]] != list(range(held.n)):
        raise RuntimeError("the evaluation's completions do not cover the held-out prompts in order")
    return held.metrics(torch.cat([p["tokens"] for p in parts]), torch.cat([p["lengths"] for p in parts]))
