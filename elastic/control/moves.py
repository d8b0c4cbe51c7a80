"""Carrying out a move: one executor for every ``Move``, planned or recovering.

The controller's Resharding state hands each move here. A move with a plan is a live reshard along it
(``driver/resharder.py``): the cost model learns its link and disk rates from the report, and the journal
records it. A move without one (``Move.rebuild``: some shard has no live holder) rebuilds every rank from
the newest state that exists (``Recovery.rebuild``). After a move, drained workers and workers beyond the
budget leave, and missing ones start in the background. A recovery's report (who died, how long, how many
steps are replayed) is kept here too. Raises what the resharder raises; changes no controller state.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from elastic.control.recovery import Recovery
from elastic.control.states import RecoveryStart
from elastic.control.wishes import Wishes
from elastic.core.config import Config
from elastic.core.layout import Placement
from elastic.core.records import RecordKind
from elastic.driver.group import WorkerGroup
from elastic.driver.resharder import ReshardReport, frozen_from_disk, reshard
from elastic.model.specs import training_specs
from elastic.plan.costmodel import CostModel
from elastic.plan.decisions import Move
from elastic.plan.domains import exposure, node_of

# A drain is trusted to finish inside its notice when the notice is at least this many times the move's
# predicted time: the cost model's reshard time is fitted from earlier moves, and a node's own load varies.
NOTICE_MARGIN = 2.0


class Mover:
    def __init__(self, cfg: Config, group: WorkerGroup, cost: CostModel, recovery: Recovery, wishes: Wishes,
                 record: Callable[..., dict]) -> None:
        self.cfg, self.group, self.cost, self.recovery, self.wishes = cfg, group, cost, recovery, wishes
        self.record = record  # the controller's journal: record(kind, text=..., **details)
        self.reshards: list[ReshardReport] = []
        self.recoveries: list[dict] = []

    def execute(self, move: Move) -> tuple[str, int]:
        """Move the job to ``move.placement``; returns (where the state came from, the step it holds)."""
        old = self.group.placement
        if move.rebuild:  # no live copy of some shard: every rank from the newest state that exists
            how, at = self.recovery.rebuild(move.placement)
            live = self.group.live()
            self.group.release([w for w in old.workers if w in live and w not in move.placement.workers], wait=False)
            return how, at
        step = self.group.committed
        report = reshard(self.group, move.plan, step, move.reason, frozen_from_disk(self.cfg, self.cost),
                         move.round_bytes)
        self.reshards.append(report)
        self.cost.observe_reshard(report.max_worker_bytes, report.transfer_seconds,
                                  report.plan_seconds + report.commit_seconds)
        disk = [(w.get("disk_bytes", 0), w.get("disk_seconds", 0.0)) for w in report.workers.values()]
        if disk:
            self.cost.observe_disk(*max(disk))
        self.record(RecordKind.RESHARD, text=report.line(), seconds=report.total_seconds, bytes=report.bytes_moved,
                    old=report.old, new=report.new, reason=report.reason)
        return "replicas", step

    def short_notice(self, move: Move) -> tuple[float, float] | None:
        """(seconds left, seconds needed) when a worker ``move`` drains must be gone before the move is predicted
        to finish, with a margin (``NOTICE_MARGIN``: the prediction is an estimate), and its node holds tensors no
        other node does; None otherwise (no deadline, time enough, or replicas elsewhere serve a loss)."""
        old = self.group.placement
        if move.rebuild or old is None:
            return None
        leaving = [w for w in old.workers if w not in move.placement.workers]
        deadline = self.wishes.earliest_deadline(leaving)
        if deadline is None:
            return None
        left, needed = deadline - time.time(), NOTICE_MARGIN * move.reshard_seconds
        if left >= needed:
            return None
        nodes = self.group.nodes()
        exposed = exposure(old, nodes, training_specs(self.cfg), self.cfg.model.n_layers)
        if not any(node_of(w, nodes) in exposed for w in leaving):
            return None
        return left, needed

    def answer_for(self, move: Move) -> str:
        """What the operator's requests riding on ``move`` are told once it is done."""
        return f"moved to {move.describe()}" + ("" if move.rebuild else f"; {self.reshards[-1].line()}")

    def recovered(self, start: RecoveryStart, placement: Placement, how: str, at: int) -> None:
        """Report a recovery that ``start`` began and a move onto ``placement`` from ``how`` (step ``at``) ended."""
        seconds, lost = time.perf_counter() - start.started, start.step - at
        self.recoveries.append({"dead": list(start.dead), "seconds": seconds, "how": how, "steps_lost": lost,
                                "layout": str(placement.layout), "step": at})
        self.record(RecordKind.RECOVERED, text=f"lost workers {list(start.dead)}; now {placement.layout} on workers "
                                               f"{list(placement.workers)} from {how} in {seconds:.2f} s"
                                               + (f", replaying {lost} steps" if lost else ""),
                    seconds=seconds, how=how, steps_lost=lost)

    def report_exposure(self, placement: Placement) -> None:
        """Journal which tensors losing each node would leave without a live copy (placements on two or more
        nodes; on one, losing it loses the driver's workers all at once, and the snapshot or checkpoint serves)."""
        nodes = self.group.nodes()
        if len({nodes.get(w) for w in placement.workers}) < 2:
            return
        specs = training_specs(self.cfg)
        exposed = exposure(placement, nodes, specs, self.cfg.model.n_layers)
        parts = [f"node {node[:8]} (workers {[w for w in placement.workers if nodes.get(w) == node]}): "
                 f"{len(names)} of {len(specs)} tensors" for node, names in sorted(exposed.items())]
        text = ("a single node loss leaves a live copy of every tensor" if not parts else
                "a single node loss would leave tensors without a live copy, so recovery would need a snapshot: "
                + "; ".join(parts))
        self.record(RecordKind.REDUNDANCY, text=text, exposed={node: len(names) for node, names in exposed.items()})

    def settle_workers(self, placement: Placement) -> None:
        """After a move: drained workers and workers beyond the budget leave once their shards have moved, and
        missing ones start (``top_up``)."""
        warm = self.group.warm()
        idle = [w for w in warm if w not in placement.workers]
        surplus = idle[: max(0, len(warm) - self.wishes.budget)]
        leaving = sorted({w for w in idle if w in self.wishes.draining} | set(surplus))
        if leaving:
            self.group.remove(leaving)
            self.wishes.forget(leaving)
            self.record(RecordKind.DRAINED, text=f"workers {leaving} left after their shards moved", workers=leaving)
        self.top_up()

    def top_up(self) -> None:
        """Start the workers the budget is missing, in the background (the job trains meanwhile); none once every
        step is done (a loss while the final state is gathered or written needs no replacement)."""
        if self.group.committed >= self.cfg.train.steps:
            return
        missing = self.wishes.budget - len(self.wishes.usable(self.group.warm())) - len(self.group.starting)
        if missing > 0:
            started = self.group.start(missing)
            self.record(RecordKind.SCALE_OUT, text=f"starting replacement workers {started} in the background")
