"""Choose the placement to run on: the best valid layout for the workers at hand.

For every worker count the job may use and every valid layout of that size, the cost model
predicts the time for the remaining steps, plus the reshard cost of getting there. The policy
keeps the current placement unless another one wins by a margin (reshards are not free), moves
when it must (a worker drains or dies, the operator asks), and pauses when no valid layout fits
the workers left.

Memory (``memory.py``): when a budget per worker is known (``runtime.memory_per_worker_gb``, else what the
controller derived from Ray's nodes, ``budgets``), a layout whose predicted peak exceeds it is never a
candidate and an operator's request for it is refused; when none fits, the ``Pause`` says which terms,
how many GB and how many workers it would take. The current placement may stay though nothing else fits:
it has run. A move's reshard rounds are bounded by the headroom of the workers taking part.

Rank assignment keeps shards where they are: each new rank goes to the worker whose current shards
overlap that rank's new boxes the most, so a reshard copies locally what it can.

The answer is typed (``decisions.py``): ``Stay``, ``Move`` (with the reshard plan its cost was computed
from, so the resharder moves exactly what the policy priced), ``Pause`` or ``Refuse``; ``decide`` never
raises for an ordinary outcome. Pure Python, no processes.
"""

from __future__ import annotations

import logging

from elastic.core.boxes import box_numel, intersect
from elastic.core.config import Config
from elastic.core.layout import Layout, Placement, TensorSpec, enumerate_layouts
from elastic.model.specs import training_specs
from elastic.plan.costmodel import CostModel
from elastic.plan.decisions import Decision, Move, Pause, Refuse, Stay
from elastic.plan.domains import spread_replicas
from elastic.plan.memory import GB, MemoryEstimate, MemoryModel, size
from elastic.plan.memory_budgets import round_bound
from elastic.plan.planner import MissingShards, Plan, cached_plan

log = logging.getLogger(__name__)


class Policy:
    def __init__(self, cfg: Config, cost: CostModel, objective: str = "cost", min_workers: int = 1,
                 margin: float = 0.05, require_replica: bool = False, memory: MemoryModel | None = None) -> None:
        if objective not in ("cost", "use_all"):
            raise ValueError(f"policy objective {objective!r} must be 'cost' or 'use_all'")
        self.cfg, self.cost, self.objective = cfg, cost, objective
        self.min_workers, self.margin, self.require_replica = min_workers, margin, require_replica
        self.specs: tuple[TensorSpec, ...] = tuple(training_specs(cfg))
        # phase -> predicate over layouts: the layouts a training phase can run on (e.g. rollouts need
        # every worker to hold the full policy).
        self.phase_filter: dict = {}
        self.nodes: dict[int, str] = {}  # worker -> its node (the failure domain); the controller keeps it current
        self.memory = memory or MemoryModel(cfg)
        self.budgets: dict[int, int] = {}  # worker -> bytes above idle it may use (from Ray); the controller's

    # ---- candidates ------------------------------------------------------------------
    def layouts(self, world: int, budget: int | None = None) -> list[Layout]:
        """The valid layouts of ``world`` ranks that fit ``budget`` bytes per worker (None: the policy's own;
        0: no limit)."""
        found = enumerate_layouts(world, self.cfg.model, self.cfg.train.global_batch)
        if self.require_replica:
            found = [l for l in found if l.dp >= 2]
        budget = self.budget() if budget is None else budget
        return [l for l in found if self.memory.peak(l) <= budget] if budget else found

    def budget(self, workers: list[int] | None = None) -> int | None:
        """Bytes per worker a layout on ``workers`` may peak at (the smallest of theirs; workers of unknown
        nodes take the smallest known): ``runtime.memory_per_worker_gb``, else the controller's ``budgets``;
        None when neither is known (then memory limits nothing)."""
        if self.cfg.runtime.memory_per_worker_gb:
            return int(self.cfg.runtime.memory_per_worker_gb * GB)
        known = [self.budgets[w] for w in workers or () if w in self.budgets] or list(self.budgets.values())
        return min(known) if known else None

    def _budget_source(self) -> str:
        if self.cfg.runtime.memory_per_worker_gb:
            return f"runtime.memory_per_worker_gb={self.cfg.runtime.memory_per_worker_gb:g}"
        return "Ray's node memory with headroom, shared by the workers there; set runtime.memory_per_worker_gb"

    def no_fit(self, workers: int, budget: int, phase: str = "train", most: int = 64) -> str:
        """Why no layout of ``workers`` ranks fits ``budget``: the closest one's largest terms, and how many
        workers with this budget each it would take (searched up to ``most``)."""
        closest = min((self.memory.estimate(l) for l in self._valid(workers, phase)), key=lambda e: e.peak,
                      default=None)
        what = f"the smallest predicted peak is {closest.describe()}" if closest else "no layout is valid"
        need = next(((n, e) for n in range(workers + 1, most + 1) if (e := self._fitting(n, budget, phase))), None)
        more = (f"it would take {need[0]} workers of {size(budget)} each ({need[1].describe(2)})" if need else
                f"no layout of up to {most} workers fits")
        return (f"no layout fits {workers} workers in {size(budget)} each ({self._budget_source()}): "
                f"{what}; {more}; waiting for workers")

    def _valid(self, world: int, phase: str) -> list[Layout]:
        return [l for l in self.layouts(world, budget=0)
                if phase not in self.phase_filter or self.phase_filter[phase](l)]

    def _fitting(self, world: int, budget: int, phase: str) -> MemoryEstimate | None:
        fit = [e for l in self._valid(world, phase) if (e := self.memory.estimate(l)).peak <= budget]
        return min(fit, key=lambda e: e.peak, default=None)

    def validate_request(self, layout: Layout, available: int) -> None:
        """Raise ValueError (one clear line) if the operator's layout cannot run here."""
        layout.validate(self.cfg.model, self.cfg.train.global_batch)
        if layout.world > available:
            raise ValueError(f"layout {layout} needs {layout.world} workers but only {available} are available; "
                             "add workers first or choose a smaller layout")
        budget = self.budget()
        if budget and (estimate := self.memory.estimate(layout)).peak > budget:
            raise ValueError(f"layout {layout} is predicted to need {estimate.describe()}, above the "
                             f"{size(budget)} budget ({self._budget_source()}); choose a more sharded layout")

    # ---- rank assignment -------------------------------------------------------------
    def _overlap(self, old: Placement, worker: int, new: Placement, rank: int) -> int:
        old_rank = old.rank_of(worker)
        if old_rank is None:
            return 0
        n_layers, total = self.cfg.model.n_layers, 0
        for spec in self.specs:
            a, b = old.box(spec, old_rank, n_layers), new.box(spec, rank, n_layers)
            if a is not None and b is not None and (piece := intersect(a, b)) is not None:
                total += box_numel(piece)
        return total

    def assign(self, old: Placement | None, layout: Layout, workers: list[int]) -> Placement:
        """Fill ``layout``'s ranks from ``workers`` (at least layout.world of them), keeping state local, then
        move replicas apart so that they sit on different nodes where the workers allow (``domains.py``)."""
        # Current holders first, then real workers, then placeholders (negative ids) for workers not started yet.
        pool = sorted(workers, key=lambda w: (old is None or old.rank_of(w) is None, w < 0, w))
        if old is None or len(pool) > 64:
            return spread_replicas(Placement(layout, tuple(pool[: layout.world])), self.nodes)
        chosen: list[int] = []
        for rank in range(layout.world):
            probe = Placement(layout, tuple(range(-layout.world, 0)))  # ids only matter through rank
            best = max((w for w in pool if w not in chosen),
                       key=lambda w: (self._overlap(old, w, probe, rank), -pool.index(w)))
            chosen.append(best)
        return spread_replicas(Placement(layout, tuple(chosen)), self.nodes)

    # ---- decision --------------------------------------------------------------------
    def plan(self, old: Placement | None, new: Placement, alive: frozenset[int] | None) -> Plan | None:
        """The reshard plan from ``old`` to ``new`` (cached per pair), or None when some shard has no live holder."""
        try:
            return cached_plan(old, new, self.specs, self.cfg.model.n_layers, self.cost.itemsize, alive,
                               self.cfg.runtime.reshard_chunk_bytes)
        except MissingShards:
            return None

    def _move(self, old: Placement | None, new: Placement, alive: frozenset[int] | None) -> tuple[float, Plan | None]:
        """(predicted reshard seconds, plan) for moving from ``old`` to ``new``."""
        if old is None:
            return 0.0, self.plan(None, new, alive)
        plan = self.plan(old, new, alive)
        if plan is None:  # lost shards come from the snapshot: every rank reloads its whole share
            share = sum(s.numel for s in self.specs) * self.cost.itemsize / new.layout.world
            return self.cost.reshard_seconds(int(share)), None
        if old == new:
            return 0.0, plan
        by_worker = plan.bytes_by_worker()
        return self.cost.reshard_seconds(max((s + r for s, r in by_worker.values()), default=0)), plan

    def _target(self, current: Placement | None, target: Placement, reason: str, step: float,
                alive: frozenset[int] | None, now: float | None = None) -> Move:
        move, plan = self._move(current, target, alive)
        return Move(target, reason, step, move, now, plan=plan, rebuild=current is not None and plan is None,
                    round_bytes=self._round_bytes(plan))

    def _round_bytes(self, plan: Plan | None) -> int:
        """The reshard's bytes per round: as much as the headroom of every worker taking part allows."""
        override = self.cfg.runtime.memory_per_worker_gb
        if plan is None or not (override or self.budgets):
            return self.cfg.runtime.reshard_round_bytes
        movers = sorted(plan.bytes_by_worker())
        budgets = {w: int(override * GB) for w in movers} if override else self.budgets
        return round_bound(self.memory, budgets, plan.old, plan.new, movers)

    def decide(self, current: Placement | None, workers: list[int], remaining: int,
               forced: Layout | None = None, must_move: bool = False, reason: str = "",
               phase: str = "train", alive: frozenset[int] | None = None) -> Decision:
        """Where to run the ``remaining`` steps: ``Stay``, ``Move``, ``Pause`` or ``Refuse`` (a ``forced`` layout
        that cannot run here).

        ``workers`` are the ones the job may use from now on; ``alive`` every live worker that can
        still send its state (draining ones included; None: all of the current placement).
        """
        if forced is not None:
            try:
                self.validate_request(forced, len(workers))
            except ValueError as err:
                return Refuse(forced, str(err))
            target = self.assign(current, forced, workers)
            if target == current:
                return Stay(f"already on {forced}")
            return self._target(current, target, reason or f"operator asked for {forced}",
                                self.cost.step_seconds(forced), alive)
        if len(workers) < self.min_workers:
            return Pause(f"{len(workers)} workers left, the job needs at least {self.min_workers}; "
                         "waiting for workers to return")
        budget = self.budget(workers)
        options = self._options(current, workers, remaining, phase, alive, budget)
        stay_valid = (current is not None and not must_move and set(current.workers) <= set(workers)
                      and (phase not in self.phase_filter or self.phase_filter[phase](current.layout)))
        if not options and stay_valid and budget:  # it has run: the model may be wrong about it, not the worker
            return Stay(f"no other layout fits {size(budget)} per worker")
        if not options and budget and any(self._valid(n, phase) for n in self._sizes(workers)):
            return Pause(self.no_fit(len(workers), budget, phase))
        if not options:
            return Pause(f"no valid layout for {len(workers)} workers (model and batch limits); waiting for workers")
        total, step, target = min(options, key=lambda o: (o[0], o[2].layout.world, str(o[2].layout)))
        if not stay_valid:
            return self._target(current, target, reason or "the current placement cannot continue", step, alive)
        now = self.cost.step_seconds(current.layout)
        grows = self.objective == "use_all" and target.layout.world != current.layout.world
        faster = now * remaining - total > self.margin * now * remaining
        if target == current or (not grows and not faster):
            return Stay("no layout is predicted to pay off")
        why = reason or ("predicted to finish sooner" if faster else
                         f"objective use_all: run on all {target.layout.world} workers")
        return self._target(current, target, why, step, alive, now)

    def _sizes(self, workers: list[int]) -> range:
        return range(len(workers), len(workers) + 1) if self.objective == "use_all" else \
            range(self.min_workers, len(workers) + 1)

    def _options(self, current: Placement | None, workers: list[int], remaining: int, phase: str,
                 alive: frozenset[int] | None, budget: int | None) -> list[tuple[float, float, Placement]]:
        """(predicted seconds to finish including the move, step seconds, placement) of every valid candidate
        that fits ``budget`` bytes per worker."""
        options = []
        for world in self._sizes(workers):
            for layout in self.layouts(world, budget or 0):
                if phase in self.phase_filter and not self.phase_filter[phase](layout):
                    continue
                target = self.assign(current, layout, workers)
                step = self.cost.step_seconds(layout)
                move, _ = self._move(current, target, alive)
                options.append((step * remaining + move, step, target))
        return options
