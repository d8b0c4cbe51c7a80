"""Run a training job on a fixed layout: start Ray (or attach), start workers, train, gather.

This is the simplest driver; ``elastic.control`` adds events and live reconfiguration on top
of the same WorkerGroup.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import ray
import torch
from tqdm import tqdm

from elastic.core.config import Config
from elastic.core.layout import Layout, Placement
from elastic.runtime.engine import StepResult

log = logging.getLogger(__name__)


def connect_ray(address: str | None = None, num_cpus: float | None = None) -> None:
    """Attach to ``address`` (or the job's cluster inside ``ray job submit``), else start a local Ray."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Ray >= 2.50 clusters use token auth; without this a driver retries silently for minutes.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)


@dataclass
class StepSummary:
    """One optimizer step as the driver saw it, combined over ranks."""

    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    seconds: float
    workers: int
    layout: str
    samples: list[int] = field(default_factory=list)
    ended: float = 0.0  # time.perf_counter() on the driver when the step's results were all in


def summarize(results: dict[int, StepResult], placement: Placement, seconds: float) -> StepSummary:
    """Combine per-rank results: losses add up over data-parallel ranks (tp rank 0 of the last stage)."""
    layout = placement.layout
    loss, samples, any_result = 0.0, [], None
    for rank, worker in enumerate(placement.workers):
        r = results[worker]
        any_result = r
        c = layout.coord(rank)
        if c.tp == 0 and r.loss is not None:
            loss += r.loss
        if c.tp == 0 and c.pp == 0:
            samples.extend(r.samples)
    return StepSummary(step=any_result.step, loss=loss, grad_norm=any_result.grad_norm, lr=any_result.lr,
                       tokens=any_result.tokens, seconds=seconds, workers=layout.world, layout=str(layout),
                       samples=sorted(samples), ended=time.perf_counter())


def progress_bar(total: int, initial: int = 0, disable: bool = False) -> tqdm:
    return tqdm(total=total, initial=initial, disable=disable, unit="step", dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")


def describe(summary: StepSummary) -> dict:
    return {"loss": f"{summary.loss:.3f}", "tok/s": f"{summary.tokens / max(summary.seconds, 1e-9):,.0f}",
            "workers": summary.workers, "layout": summary.layout}


@dataclass
class RunResult:
    history: list[StepSummary]
    state: dict[str, torch.Tensor] | None
    seconds: float


def train(cfg: Config, layout: Layout, progress: bool = True, gather: bool = True) -> RunResult:
    """Train ``cfg.train.steps`` steps on ``layout`` with ``layout.world`` fresh workers."""
    from elastic.driver.ray_group import WorkerGroup
    from elastic.model.specs import state_specs

    layout.validate(cfg.model, cfg.train.global_batch)
    connect_ray()
    started = time.perf_counter()
    group = WorkerGroup(cfg)
    try:
        workers = group.spawn(layout.world)
        placement = Placement(layout, tuple(workers))
        group.setup(placement)
        history = []
        bar = progress_bar(cfg.train.steps, disable=not progress)
        for _ in range(cfg.train.steps):
            t0 = time.perf_counter()
            summary = summarize(group.step(), placement, time.perf_counter() - t0)
            history.append(summary)
            bar.set_postfix(describe(summary), refresh=False)
            bar.update(1)
        bar.close()
        state = group.gather_full_state(state_specs(cfg))[1] if gather else None
        return RunResult(history, state, time.perf_counter() - started)
    finally:
        group.shutdown()


def run_grpo(cfg: Config, options=None):
    """A GRPO run under the controller (rollout and train phases, live relayouts). Returns (result, workload)."""
    from elastic.control.controller import Controller, ControllerOptions
    from elastic.control.workload import GRPOWorkload

    workload = GRPOWorkload(cfg)
    controller = Controller(cfg, options or ControllerOptions(), workload=workload)
    try:
        result = controller.run()
    finally:
        controller.shutdown()
    return result, workload, controller
