"""What each controller state does: one handler per state, ``(controller, state) -> next state``.

``HANDLERS`` maps each state class of ``states.py`` to its handler; ``Controller.tick`` runs the current
one and checks the transition it returns against the table. Only handlers choose the next state; the
helpers here (``arrivals``, ``train``, ``decide``) return values. Planning and Recovering take the policy's
typed decision apart with one ``match``; every move, planned or recovering, goes through Resharding and
the one executor (``moves.Mover``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from elastic.control.events import Event
from elastic.control.memory_budget import see_cluster
from elastic.control.states import (
    Done,
    Finishing,
    Launching,
    Paused,
    Planning,
    Preparing,
    Recovering,
    RecoveryStart,
    Resharding,
    Resuming,
    Running,
)
from elastic.core.layout import Layout
from elastic.core.records import RecordKind
from elastic.driver.checkpoints import resume_checkpoint
from elastic.driver.exporter import export_from_workers
from elastic.driver.group import WorkerFailure
from elastic.driver.resharder import ReshardFailed
from elastic.plan.decisions import Decision, Move, Pause, Refuse, Stay

if TYPE_CHECKING:
    from elastic.control.controller import Controller


def running(ctl: Controller, state: Running):
    events = arrivals(ctl)
    if events is not None:
        return Planning(tuple(events))
    if ctl.step >= ctl.cfg.train.steps:
        return Finishing("every step is done")
    outcome = train(ctl, state.fresh)
    if isinstance(outcome, WorkerFailure):
        return Recovering(outcome)
    return Running(fresh=state.fresh and not outcome)


def preparing(ctl: Controller, state: Preparing):
    placement = state.move.placement
    if ctl.group.build_done(placement) or ctl.step - state.since >= ctl.control.prepare_wait_steps:
        return Resharding(state.move, state.requests)
    events = arrivals(ctl)
    if events is not None:  # decide again with what arrived; this move's requests get that answer
        return Planning(tuple(events), carried=state.requests, forced=state.forced)
    if ctl.step >= ctl.cfg.train.steps:
        ctl.inbox.answer(state.requests, f"not moved to {placement.layout}: every step is done")
        return Finishing("every step is done")
    outcome = train(ctl, state.fresh)
    if isinstance(outcome, WorkerFailure):
        return Recovering(outcome, state.requests)
    return dataclasses.replace(state, fresh=state.fresh and not outcome)


def planning(ctl: Controller, state: Planning):
    events, group = list(state.events), ctl.group
    requests = (*state.carried, *events)
    folded = ctl.wishes.fold(events, group.live(), len(ctl.usable()), len(group.starting),
                             ctl.policy.validate_request)
    current = group.placement
    for event, why in folded.refused:
        ctl.inbox.answer([event], f"refused: {why}; training continues on "
                                   f"{current.layout if current else '-'}")
        ctl.record(RecordKind.REFUSED, text=why)
    if folded.cancel_starting:
        cancelled = group.cancel_starting(folded.cancel_starting)
        ctl.record(RecordKind.SCALE_IN, text=f"cancelled starting workers {cancelled}: "
                                              f"budget is {ctl.wishes.budget}")
    for event in events:
        ctl.record(RecordKind.EVENT, text=event.describe(), type=event.kind.value)
    if folded.stop:
        ctl.inbox.answer(requests, f"stopping at step {ctl.step}")
        ctl.record(RecordKind.STOP, text=f"stopping at step {ctl.step} on request")
        return Finishing("stopped on request")
    lost = sorted(w for w in (current.workers if current else ()) if w not in group.live())
    if lost:  # noticed outside a failing call (e.g. while forming): recover first, then plan
        return Recovering(WorkerFailure({w: "process died" for w in lost}, {}), requests)
    if ctl.wishes.paused:
        ctl.inbox.answer(requests, "paused")
        return Paused("paused by the operator")
    # A newer layout request wins over one carried from a superseded move; the first placement's is the config's.
    forced = folded.forced or state.forced or (ctl.control.first_layout() if current is None else None)
    return act(ctl, decide(ctl, forced, folded.must_move, folded.reason), requests, forced)


def launching(ctl: Controller, state: Launching):
    placement = state.move.placement
    try:
        seconds = ctl.group.setup(placement, step=0)
    except WorkerFailure as failure:
        if not failure.dead:
            raise
        ctl.failed(failure, "while forming the first placement")
        return Planning(carried=state.requests)
    ctl.record(RecordKind.START,
               text=f"{placement.layout} on workers {list(placement.workers)} in {seconds:.2f} s")
    ctl.mover.report_exposure(placement)
    ctl.inbox.answer(state.requests, f"started {state.move.describe()}")
    return Running(fresh=True)


def resuming(ctl: Controller, state: Resuming):
    placement = state.move.placement
    try:
        resume_checkpoint(ctl.group, state.folder, placement, verify=False)  # verified at start
    except WorkerFailure as failure:
        if not failure.dead:
            raise
        ctl.failed(failure, "while resuming")
        return Planning(carried=state.requests)
    ctl.record(RecordKind.RESUME, text=f"{placement.layout} on workers {list(placement.workers)} from "
                                        f"{state.folder} at step {ctl.step}")
    ctl.inbox.answer(state.requests, f"resumed on {state.move.describe()}")
    return Running(fresh=True)


def resharding(ctl: Controller, state: Resharding):
    move = state.move
    short = ctl.mover.short_notice(move)
    if short is not None:  # the node may go mid-move: a snapshot of this step first, so that nothing is replayed
        try:
            done = ctl.safe.snapshot_now(ctl.group.committed, max(0.0, short[0]))
        except WorkerFailure as failure:
            ctl.failed(failure, "during a snapshot for a short drain notice")
            return Recovering(failure, state.requests, since=state.recovering)
        ctl.record(RecordKind.REDUNDANCY, text=f"a drain notice ends in {short[0]:.1f} s, under the {short[1]:.1f} s "
                                              f"a live move is trusted with: {done}; the live move goes on")
    try:
        how, at = ctl.mover.execute(move)
    except ReshardFailed as err:
        ctl.inbox.answer(state.requests, f"reshard to {move.placement.layout} failed: {err}")
        ctl.record(RecordKind.RESHARD_FAILED, text=str(err))
        return Running() if err.old_intact else Recovering(err.failure, since=state.recovering)
    except WorkerFailure as failure:  # a worker died while committing the new placement, or rebuilding
        ctl.record(RecordKind.RESHARD_FAILED, text=f"during commit: {failure}")
        return Recovering(failure, state.requests, since=state.recovering)
    ctl.inbox.answer(state.requests, ctl.mover.answer_for(move))
    if state.recovering is not None:
        ctl.mover.recovered(state.recovering, move.placement, how, at)
    ctl.mover.settle_workers(move.placement)
    ctl.mover.report_exposure(move.placement)
    return Running(fresh=True)


def recovering(ctl: Controller, state: Recovering):
    failure = culprits_dead(ctl, state.failure)
    dead = sorted(failure.dead)
    ctl.inbox.answer(state.requests, f"cancelled: workers {dead} were lost first; the job recovers, then "
                                      "ask again if it still applies")
    ctl.wishes.forget(dead)
    # One report per recovery: a loss that interrupts one (``since``) joins it, timed from its start.
    since = state.since
    lost = (RecoveryStart(tuple(sorted({*since.dead, *dead})), since.started, since.step) if since else
            RecoveryStart(tuple(dead), time.perf_counter(), ctl.step))
    try:
        decision = ctl.recovery.decide(failure, ctl.remaining, ctl.usable(), ctl.phase)
    except WorkerFailure as again:  # another loss while the survivors settled: start over
        ctl.failed(again, "during recovery")
        return Recovering(again, since=lost)
    match decision:
        case Move():
            ctl.record(RecordKind.DECISION, text=decision.describe(), layout=str(decision.placement.layout),
                       workers=list(decision.placement.workers))
            return Resharding(decision, recovering=lost)
        case Pause() | Refuse() | Stay():  # must_move: only a Move or a Pause comes back
            ctl.record(RecordKind.PAUSE, text=decision.describe())
            ctl.mover.top_up()  # replacements warm up meanwhile; Paused plans again once one is warm
            return Paused(decision.reason)
    raise TypeError(f"the policy answered {decision!r}, which is not a Decision")


def paused(ctl: Controller, state: Paused):
    trouble = ctl.group.start_trouble()
    if trouble is not None and not ctl.group.starting and len(ctl.usable()) < ctl.control.min_workers:
        raise RuntimeError(f"the job needs {ctl.control.min_workers} workers and has {len(ctl.usable())}, and "
                           f"cannot start more: {trouble}")
    events = ctl.inbox.poll(ctl.step)
    if events or ctl.group.take_warmed():
        return Planning(tuple(events))
    time.sleep(ctl.control.poll_interval_s)
    return state


def finishing(ctl: Controller, state: Finishing):
    tensors = export = None
    try:
        ctl.safe.final(ctl.step, lambda kind, text, **more: ctl.record(kind, text=text, **more))
    except WorkerFailure as failure:  # recover, and write it again from the survivors
        ctl.failed(failure, "while writing the final checkpoint")
        return Recovering(failure)
    if ctl.export_dir is not None and ctl.group.placement is not None:
        try:  # the workers write the model from their shards; the driver holds no tensor (driver/exporter.py)
            export = export_from_workers(ctl.group, ctl.cfg, ctl.export_dir)
        except WorkerFailure as failure:  # recover, and write it again from the survivors
            ctl.failed(failure, "while writing the model")
            return Recovering(failure)
        writers = sorted({w for w in export.writers.values() if w is not None})
        ctl.record(RecordKind.EXPORT, text=f"workers {writers} wrote {', '.join(map(str, export.folders.values()))} "
                   f"({export.written_bytes / 1e6:.1f} MB in {export.seconds:.2f} s; the driver received "
                   f"{export.driver_bytes} tensor bytes)", folders={k: str(v) for k, v in export.folders.items()},
                   driver_bytes=export.driver_bytes)
    if ctl.gather_tensors:
        try:
            tensors = ctl.group.gather_tensors()[1]
        except WorkerFailure as failure:  # recover, and gather again from the survivors
            ctl.failed(failure, "while gathering the final tensors")
            return Recovering(failure)
    return Done(state.reason, tensors, export)



# ---- helpers: arrivals, train and decide return values; act and begin are the end of Planning ---------
def culprits_dead(ctl: Controller, failure: WorkerFailure) -> WorkerFailure:
    """The failure with its culprits dead: a call that failed while every process lives (a bug, a corrupted
    worker) gets its first failing worker killed, so that recovery replaces it as it would a crash. The same
    step failing ``control.max_step_failures`` times ends the job, in one line."""
    strikes = ctl.step_failures.setdefault(ctl.step, [])
    strikes.append(failure.first)
    if len(strikes) >= ctl.control.max_step_failures:
        raise RuntimeError(f"step {ctl.step} failed {len(strikes)} times (culprits {strikes}), so the job stops; "
                           f"the last failure: {failure}")
    if failure.dead:
        return failure
    culprit = failure.first
    ctl.group.remove([culprit])
    ctl.record(RecordKind.FAILURE, text=f"worker {culprit} failed with every process alive; killed it so that "
                                        f"recovery replaces it", dead=[culprit])
    return WorkerFailure({culprit: f"killed after its call failed: {failure.failed[culprit]}"}, {}, failure.details)



def arrivals(ctl: Controller) -> list[Event] | None:
    """Events and newly warm workers since the last look; None when there are neither."""
    warmed = ctl.group.take_warmed()
    if warmed:
        ctl.record(RecordKind.WORKERS_READY, text=f"workers {warmed} warmed up", workers=warmed)
    events = ctl.inbox.poll(ctl.step)
    return events if events or warmed else None


def train(ctl: Controller, fresh: bool) -> bool | WorkerFailure:
    """One tick of the workload: True if an optimizer step was counted, False if it did other work (a
    rollout, a phase change); the failure if a worker died (during the step, a snapshot, a checkpoint or an
    evaluation)."""
    try:
        ctl.evaluation.before_step(ctl)  # an evaluation put off for a layout that can do it (GRPO's rollouts)
    except WorkerFailure as failure:
        ctl.failed(failure, f"while evaluating after step {ctl.step}")
        return failure
    placement, started = ctl.group.placement, time.perf_counter()
    try:
        results = ctl.workload.step(ctl)
    except WorkerFailure as failure:
        if failure.step_results is not None:  # every rank computed it before the loss: the step counts
            ctl.steps.count(failure.step_results, placement, started, fresh, ctl.step)
        ctl.failed(failure)
        return failure
    if results is None:
        return False
    ctl.steps.count(results, placement, started, fresh, ctl.step)
    if fresh and ctl.control.prepare_ahead:  # a new placement: get ready to lose any one worker
        ctl.group.prepare(ctl.recovery.fallbacks(ctl.remaining, ctl.usable(), ctl.phase))
    lost = ctl.safe.after_step(ctl.step, ctl.cfg.train.steps, ctl.snapshot_interval(),
                               lambda kind, text, **more: ctl.record(kind, text=text, **more))
    if lost is not None:
        ctl.failed(lost[1], lost[0])
        return lost[1]
    try:
        ctl.evaluation.after_step(ctl)  # every train.eval_every steps; a task between steps, not a state
    except WorkerFailure as failure:
        ctl.failed(failure, f"while evaluating after step {ctl.step}")
        return failure
    return True


def decide(ctl: Controller, forced: Layout | None, must: bool, reason: str) -> Decision:
    """The policy's answer for the workers at hand."""
    current = ctl.group.placement
    # Offer the policy a budget's worth of workers: the current ones first, then spares, then
    # workers still warming up, then placeholders (negative ids) for workers not started yet.
    usable = sorted(ctl.usable(), key=lambda w: (current is None or current.rank_of(w) is None, w))
    pool = usable + ctl.group.starting
    budget = ctl.wishes.budget
    see_cluster(ctl.policy, ctl.group)
    candidates = (pool + [-(i + 1) for i in range(max(0, budget - len(pool)))])[:budget]
    return ctl.policy.decide(current, candidates, ctl.remaining, forced, must, reason, ctl.phase,
                             alive=ctl.group.live())


def act(ctl: Controller, decision: Decision, requests: tuple, forced: Layout | None):
    """Planning's next state for the policy's answer; every request among ``requests`` is answered or carried."""
    current = ctl.group.placement
    match decision:
        case Refuse(reason=why):
            ctl.inbox.answer(requests, f"refused: {why}")
            ctl.record(RecordKind.REFUSED, text=why)
            return Running() if current else Paused(why)
        case Stay(reason=why):
            ctl.inbox.answer(requests, f"keep {current.layout} on {len(current.workers)} workers ({why})")
            ctl.record(RecordKind.KEEP, text=f"stay on {current.layout}: {why}")
            return Running()
        case Pause(reason=why):
            ctl.inbox.answer(requests, decision.describe())
            ctl.record(RecordKind.PAUSE, text=decision.describe())
            return Paused(why)
        case Move():
            return begin(ctl, decision, requests, forced)
    raise TypeError(f"the policy answered {decision!r}, which is not a Decision")


def begin(ctl: Controller, move: Move, requests: tuple, forced: Layout | None):
    """Start carrying out ``move``: its missing workers first, then its first placement, or its skeleton."""
    group, current, wanted = ctl.group, ctl.group.placement, move.placement.workers
    missing = [w for w in wanted if w < 0]
    if missing:
        started = group.start(len(missing))
        ctl.record(RecordKind.SCALE_OUT, text=f"starting workers {started} in the background for "
                                               f"{move.describe()}")
    if missing or any(w in group.starting for w in wanted):
        ctl.inbox.answer(requests, f"starting workers for {move.describe()}")
        return Running() if current else Paused("waiting for workers to warm up")
    ctl.record(RecordKind.DECISION, text=move.describe(), layout=str(move.placement.layout),
               workers=list(wanted))
    if current is None:
        if ctl.resume_from is not None:
            return Resuming(move, ctl.resume_from, requests)
        return Launching(move, requests)
    if ctl.control.prepare_ahead:  # build the skeleton while training goes on; move once it is ready
        group.prepare([move.placement])
        if not group.build_done(move.placement):
            return Preparing(move, requests, since=ctl.step, forced=forced)
    return Resharding(move, requests)


HANDLERS = {Planning: planning, Launching: launching, Resuming: resuming, Preparing: preparing,
            Resharding: resharding, Running: running, Recovering: recovering, Paused: paused,
            Finishing: finishing}
