"""The ``[control]`` config section: how the controller runs a job (layouts, worker bounds, protection).

One configuration tree: these are knobs like every other section's, so ``elastic train`` generates their
flags (``--control.<field>``, and ``--<field>`` with dashes for short), a TOML file sets them under
``[control]``, and a run records them. The section registers itself when this module is imported; a
``Config`` without it runs on the defaults (``ControlConfig.of``). What is not configuration (event
sources, a run folder, the progress bar) is an argument of the ``Controller``. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass

from elastic.core.config import Config, knob, register_section
from elastic.core.layout import Layout

OBJECTIVES = ("cost", "use_all")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class ControlConfig:
    """How the controller runs the job: layout choice, worker bounds, snapshots and checkpoints."""

    layout: str = knob("auto", "the first layout, degrees like dp=2,tp=2; auto: the cost model chooses")
    objective: str = knob("cost", "cost: run on the layout the cost model predicts fastest; use_all: always use "
                                  "every worker")
    min_workers: int = knob(1, "below this many workers the job pauses and waits")
    max_workers: int = knob(64, "the most workers the job uses, whatever asks for more (the operator, the cluster "
                                "watcher, recovery's replacements)")
    watch_cluster: bool = knob(False, "scale with Ray's cluster capacity (its CPUs / runtime.cpus_per_worker)")
    watch_drains: bool = knob(True, "act on Ray's preemption notices: the workers on a node Ray drains (GCS "
                                    "DrainNode, as autoscalers send before a preemption) move their shards off it live")
    poll_interval_s: float = knob(0.5, "how often the control plane and the cluster are polled")
    require_replica: bool = knob(False, "only layouts with dp >= 2, so any single loss recovers without a replay")
    snapshot_every: int = knob(-1, "in-memory snapshot every k steps; -1 (auto): while the placement keeps no "
                                   "replica of some shard, as often as keeps the copy's stall under snapshot_share of "
                                   "the step time; 0: never. Rounded up to the workload's restart points")
    snapshot_share: float = knob(0.02, "auto snapshots: the share of step time their stall may take")
    checkpoint_dir: str = knob("auto", "where on-disk checkpoints go; auto: RUN_DIR/checkpoints (a run of the "
                                       "elastic command has one), empty: none")
    checkpoint_every: int = knob(-1, "checkpoint every k steps and at the end; -1 (auto): every checkpoint_minutes "
                                     "and at the end; 0: never. Written in the background; rounded like "
                                     "snapshot_every")
    checkpoint_minutes: float = knob(10.0, "auto checkpoints: minutes of training between two")
    keep_checkpoints: int = knob(2, "checkpoints kept in checkpoint_dir, the newest ones (0: all)")
    resume: str = knob("auto", "a checkpoint folder or checkpoint dir to resume its latest (grpo: one at a GRPO step "
                               "boundary); auto: the newest checkpoint in checkpoint_dir, if any; empty: start afresh")
    phase_layouts: str = knob("", "layouts pinned per training phase, phase:layout pairs separated by ';', e.g. "
                                  "'rollout:dp=4; train:dp=2,tp=2'")
    max_step_failures: int = knob(3, "the job stops when one step fails this many times (each failure's culprit "
                                     "is replaced first); a crash, a hang or a bug that keeps coming back")
    prepare_ahead: bool = knob(True, "build the next placement's skeleton in the background and reshard once it "
                                     "is ready (training goes on meanwhile), and keep a fallback for a lost worker")
    prepare_wait_steps: int = knob(3, "steps a planned move waits for its skeleton at most; then it moves and "
                                      "waits for the build on the stall")

    def __post_init__(self) -> None:
        _require(self.objective in OBJECTIVES,
                 f"control.objective={self.objective!r} must be one of {', '.join(OBJECTIVES)}")
        _require(self.min_workers >= 1, f"control.min_workers={self.min_workers} must be >= 1")
        _require(self.max_step_failures >= 1, f"control.max_step_failures={self.max_step_failures} must be >= 1")
        _require(self.max_workers >= self.min_workers,
                 f"control.max_workers={self.max_workers} is below control.min_workers={self.min_workers}")
        _require(self.poll_interval_s >= 0, f"control.poll_interval_s={self.poll_interval_s} must be >= 0")
        for name in ("snapshot_every", "checkpoint_every"):
            _require(getattr(self, name) >= -1, f"control.{name}={getattr(self, name)} must be -1 (auto), 0 (off) "
                                                "or a number of steps")
        _require(self.prepare_wait_steps >= 0, f"control.prepare_wait_steps={self.prepare_wait_steps} must be >= 0")
        _require(0 < self.snapshot_share <= 1, f"control.snapshot_share={self.snapshot_share} must be in (0, 1]")
        _require(self.checkpoint_minutes > 0, f"control.checkpoint_minutes={self.checkpoint_minutes} must be > 0")
        _require(self.keep_checkpoints >= 0, f"control.keep_checkpoints={self.keep_checkpoints} must be >= 0")
        self.first_layout()  # a malformed layout fails here, with Layout.parse's message
        self.pinned()

    def first_layout(self) -> Layout | None:
        """The layout to start on, or None when the cost model chooses."""
        return None if self.layout == "auto" else Layout.parse(self.layout)

    def pinned(self) -> dict[str, Layout]:
        """phase -> the layout the operator pinned for it."""
        out = {}
        for entry in filter(None, (e.strip() for e in self.phase_layouts.split(";"))):
            phase, sep, layout = entry.partition(":")
            _require(bool(sep and phase and layout),
                     f"control.phase_layouts entry {entry!r} is not phase:layout (e.g. rollout:dp=4)")
            out[phase.strip()] = Layout.parse(layout.strip())
        return out

    @staticmethod
    def of(cfg: Config) -> ControlConfig:
        """The run's ``[control]`` section, or the defaults when it has none."""
        return cfg.section("control") or ControlConfig()


register_section("control", ControlConfig)
