"""Run a job under the controller in one call: start workers, train, gather, shut down.

``run_job`` is what the CLI, the examples and the benchmarks use; ``train`` is the fixed-layout case.
Both return the controller's ``RunResult`` (one result type for every run).
"""

from __future__ import annotations

import dataclasses

from elastic.control.controller import Controller, ControllerOptions, RunResult
from elastic.control.workload import Workload
from elastic.core.config import Config
from elastic.core.layout import Layout


def run_job(cfg: Config, options: ControllerOptions | None = None,
            workload: Workload | None = None) -> tuple[RunResult, Controller]:
    """Run ``cfg`` to the end under a controller (Ray must be connected). Returns (result, controller)."""
    controller = Controller(cfg, options or ControllerOptions(), workload=workload)
    try:
        result = controller.run()
    finally:
        controller.shutdown()
    return result, controller


def train(cfg: Config, layout: Layout, progress: bool = True, gather: bool = True) -> RunResult:
    """Train ``cfg.train.steps`` steps on ``layout`` with ``layout.world`` fresh workers."""
    from elastic.driver.connect import connect_ray

    layout.validate(cfg.model, cfg.train.global_batch)
    connect_ray()
    cfg = cfg.replace(runtime=dataclasses.replace(cfg.runtime, workers=layout.world))
    options = ControllerOptions(layout=layout, objective="use_all", progress=progress, gather_tensors=gather)
    return run_job(cfg, options)[0]
