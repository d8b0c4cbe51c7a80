"""What the controller runs between events: one optimizer step of a workload per tick.

- ``LMWorkload``: next-token prediction on the configured dataset (pre-training, LoRA SFT).
- ``GRPOWorkload``: RL. Each GRPO step first needs rollouts (the *rollout* phase, on a
  data-parallel layout where every worker holds the whole policy), then ``num_iterations``
  policy-gradient steps (the *train* phase, on whatever layout the policy picks for it). Phase
  changes go through the controller as events, so it can reshard at each phase boundary when
  the cost model (or the operator's ``phase_layouts``) says so.

A workload's ``step`` returns the per-worker results of one committed optimizer step, or None
when it did other work this tick (a rollout, or asking for a phase change).
"""

from __future__ import annotations

import time

from elastic.control.events import PhaseChange
from elastic.recipes.grpo.loop import GRPOLoop, StepBatch


class LMWorkload:
    name = "lm"

    def step(self, controller) -> dict | None:
        return controller.group.step()


def data_parallel_only(layout) -> bool:
    return (layout.fsdp, layout.tp, layout.pp) == (1, 1, 1)


class GRPOWorkload:
    name = "grpo"

    def __init__(self, cfg) -> None:
        self.loop = GRPOLoop(cfg)
        self.batches: dict[int, StepBatch] = {}
        self.seconds = {"rollout": 0.0, "train": 0.0}
        self.stats: dict[int, dict] = {}

    def phase_filters(self) -> dict:
        # Rollouts need the full policy on every worker; the GRPO step has no pipeline schedule.
        return {"rollout": data_parallel_only, "train": lambda layout: layout.pp == 1}

    def _want(self, controller, phase: str) -> bool:
        if controller.phase == phase:
            return False
        controller.submit(PhaseChange(reason=f"{phase} phase", phase=phase))
        return True

    def step(self, controller) -> dict | None:
        group = controller.group
        committed, placement = group.committed, group.placement
        k, iteration = divmod(committed, self.loop.grpo.num_iterations)
        layout = placement.layout
        if k not in self.batches:
            if self._want(controller, "rollout"):
                return None
            started = time.perf_counter()
            prompts = self.loop.prompts(k)
            calls = {w: (committed, self.loop.share(prompts, layout.data_index(r), layout.data_parallel), k)
                     for r, w in enumerate(placement.workers)}
            out = group.call_each("rollout", calls)
            parts = [out[w] for r, w in enumerate(placement.workers)]  # dp-only: rank order is data order
            self.batches = {k: self.loop.build(k, parts)}
            self.stats[k] = self.batches[k].stats
            self.seconds["rollout"] += time.perf_counter() - started
            return None
        if self._want(controller, "train"):
            return None
        started = time.perf_counter()
        batch = self.batches[k]
        calls = {w: (committed, self.loop.shard(batch, layout.data_index(r), layout.data_parallel), batch.batch)
                 for r, w in enumerate(placement.workers)}
        results = group.step_with("train_grpo", calls)
        first = placement.workers[0]
        for w, result in results.items():  # the ledger: step k's prompts, counted once
            result.samples = list(batch.prompts) if w == first and iteration == 0 else []
        self.seconds["train"] += time.perf_counter() - started
        return results
