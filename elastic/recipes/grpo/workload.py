"""The GRPO workload: the driver's side of a GRPO run under the controller.

Each GRPO step first needs rollouts (the *rollout* phase, on a data-parallel layout where every
worker holds the whole policy), then ``num_iterations`` policy-gradient steps (the *train* phase, on
whatever layout the policy picks for it). Phase changes go through the controller as events, so it
can reshard at each phase boundary when the cost model (or the operator's ``phase_layouts``) says so.
The worker side is ``worker.py`` (the ``Rollout`` and ``GRPOStep`` tasks); the bookkeeping is
``loop.py``. Each step's results carry TRL's rollout metrics of its batch (``report.py``, computed here
from the whole batch) beside the ranks' own (``StepResults``), for ``metrics.jsonl``.

Restart points are GRPO step boundaries (``restart_every = num_iterations``). The rollout batch of
GRPO step ``k`` (completions, rewards, advantages and the *old* log-probs of the policy that sampled
them) lives here, on the driver, while its ``num_iterations`` optimizer steps run; snapshots and
checkpoints hold the workers' tensors only. The controller therefore takes them only at optimizer
steps ``k * num_iterations``, where the batch is not yet made: a restore there samples it again from
the restored policy, which is the policy that sampled it the first time, so the replay is exact. A
recovery from replicas keeps the committed step and this batch. (A restore inside the iterations would
resample from a later iteration's policy and take its log-probs as the old ones.)
"""

from __future__ import annotations

import time

from elastic.control.events import PhaseChange
from elastic.control.workload import JobView
from elastic.core.config import Config
from elastic.core.layout import Layout
from elastic.driver.summary import StepResults
from elastic.recipes.grpo.evaluation import HeldOutPrompts, eval_reward
from elastic.recipes.grpo.loop import GRPOLoop, StepBatch
from elastic.recipes.grpo.worker import GRPOStep, Rollout


def data_parallel_only(layout: Layout) -> bool:
    return (layout.fsdp, layout.tp, layout.pp) == (1, 1, 1)


class GRPOWorkload:
    name = "grpo"

    def __init__(self, cfg: Config) -> None:
        self.loop = GRPOLoop(cfg)
        self.restart_every = self.loop.grpo.num_iterations  # see the module docstring
        self.batches: dict[int, StepBatch] = {}
        self.seconds = {"rollout": 0.0, "train": 0.0}
        self.stats: dict[int, dict] = {}
        # train.eval_every's held-out prompts (evaluation.py), built now so that a run without any fails at start
        self.held = HeldOutPrompts(self.loop) if cfg.train.eval_every else None

    def phase_filters(self) -> dict:
        # Rollouts need the full policy on every worker; the GRPO step has no pipeline schedule.
        return {"rollout": data_parallel_only, "train": lambda layout: layout.pp == 1}

    def evaluate(self, job: JobView) -> dict[str, float] | str:
        """TRL's ``eval_reward`` ... of greedy completions of the held-out prompts, or why not on this layout."""
        return eval_reward(self.held, job)

    def _want(self, job: JobView, phase: str) -> bool:
        if job.phase == phase:
            return False
        job.submit(PhaseChange(reason=f"{phase} phase", phase=phase))
        return True

    def step(self, job: JobView) -> dict | None:
        group = job.group
        committed, placement = group.committed, group.placement
        k, iteration = divmod(committed, self.loop.grpo.num_iterations)
        layout = placement.layout
        if k not in self.batches:
            if self._want(job, "rollout"):
                return None
            started = time.perf_counter()
            prompts = self.loop.prompts(k)
            tasks = {w: Rollout(self.loop.share(prompts, layout.data_index(r), layout.data_parallel), k)
                     for r, w in enumerate(placement.workers)}
            out = group.run(tasks)
            parts = [out[w] for w in placement.workers]  # dp-only: rank order is data order
            self.batches = {k: self.loop.build(k, parts)}
            self.stats[k] = self.batches[k].stats
            self.seconds["rollout"] += time.perf_counter() - started
            return None
        if self._want(job, "train"):
            return None
        started = time.perf_counter()
        batch = self.batches[k]
        tasks = {w: GRPOStep(self.loop.shard(batch, layout.data_index(r), layout.data_parallel), batch.batch)
                 for r, w in enumerate(placement.workers)}
        results = group.step(tasks)  # each rank reports the completions it trained on (its StepResult.samples)
        self.seconds["train"] += time.perf_counter() - started
        # TRL logs its rollout metrics (reward, completion lengths) with every step that trains on the batch.
        return StepResults(results, batch.metrics)
