"""Run a job under the controller in one call: start workers, train, gather, shut down.

``run_job`` is what the CLI, the examples and the benchmarks use; ``train`` is the fixed-layout case.
Both return the controller's ``RunResult`` (one result type for every run).
"""

from __future__ import annotations

import dataclasses

from elastic.control.config import ControlConfig
from elastic.control.controller import Controller
from elastic.control.result import RunResult
from elastic.control.workload import Workload
from elastic.core.config import Config
from elastic.core.layout import Layout


def run_job(cfg: Config, workload: Workload | None = None, **wiring) -> tuple[RunResult, Controller]:
    """Run ``cfg`` to the end under a controller (Ray must be connected); ``wiring``: the Controller's keyword
    arguments (sources, run_dir, progress, ...). Returns (result, controller)."""
    controller = Controller(cfg, workload=workload, **wiring)
    try:
        result = controller.run()
    finally:
        controller.shutdown()
    return result, controller


def with_control(cfg: Config, **fields) -> Config:
    """``cfg`` with ``[control]`` fields set (the rest keep their values, or the defaults); a ``Layout`` may be
    given for ``layout``, and a {phase: Layout} dict for ``phase_layouts``."""
    if isinstance(fields.get("layout"), Layout):
        fields["layout"] = str(fields["layout"])
    if isinstance(fields.get("phase_layouts"), dict):
        fields["phase_layouts"] = "; ".join(f"{phase}:{layout}" for phase, layout in fields["phase_layouts"].items())
    return cfg.replace(control=dataclasses.replace(ControlConfig.of(cfg), **fields))


def train(cfg: Config, layout: Layout, progress: bool = True, gather: bool = True) -> RunResult:
    """Train ``cfg.train.steps`` steps on ``layout`` with ``layout.world`` fresh workers."""
    from elastic.driver.connect import connect_ray

    layout.validate(cfg.model, cfg.train.global_batch)
    connect_ray()
    cfg = cfg.replace(runtime=dataclasses.replace(cfg.runtime, workers=layout.world))
    cfg = with_control(cfg, layout=layout, objective="use_all")
    return run_job(cfg, progress=progress, gather_tensors=gather)[0]
