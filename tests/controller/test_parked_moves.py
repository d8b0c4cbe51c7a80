"""A move that waits for its skeleton (the Preparing state), on the fake group: built, superseded, cancelled.

The fake group reports a placement's background build done after ``prepare_polls`` asks, so a move stays
parked for a few steps while training goes on. In every case the operator's request is answered exactly
once, and the run stays exactly-once.
"""

from __future__ import annotations

import pytest

from elastic.control.events import AddWorkers, Drain, PhaseChange, Relayout, SetBudget
from elastic.core.layout import Layout
from elastic.core.records import RecordKind
from tests.controller.test_transitions import assert_exactly_once, at_step, finish, kinds, make, tick_until

pytestmark = pytest.mark.timeout(20)


def last_decision_step(controller) -> int:
    return [e["step"] for e in controller.events if e["kind"] == RecordKind.DECISION][-1]


def parked(polls: int, wait_steps: int = 50, **control):
    controller, group, plane = make(prepare_ahead=True, prepare_wait_steps=wait_steps, **control)
    group.prepare_polls = polls
    tick_until(controller, at_step(2))
    return controller, group, plane


def test_a_parked_move_trains_while_it_builds_then_moves_and_answers_once():
    controller, group, plane = parked(polls=4)
    request = plane.request(Relayout(reason="operator", layout=Layout(fsdp=2)))
    states = tick_until(controller, lambda c: c.group.placement.layout == Layout(fsdp=2))
    assert states == ["Running", "Planning", "Preparing", "Resharding", "Running"]
    decided = last_decision_step(controller)
    moved = controller.reshards[0].step
    assert moved > decided, "training went on while the skeleton was built"
    assert [a[:len("moved to fsdp=2")] for a in plane.answers[request]] == ["moved to fsdp=2"]
    assert Layout(fsdp=2) in [p.layout for p in group.prepared_placements]
    finish(controller)
    assert_exactly_once(controller, group)


def test_a_parked_move_waits_at_most_prepare_wait_steps():
    controller, group, plane = parked(polls=1000, wait_steps=2)
    plane.request(Relayout(reason="operator", layout=Layout(fsdp=2)))
    tick_until(controller, lambda c: c.reshards)
    assert controller.reshards[0].step == last_decision_step(controller) + 2


def test_a_phase_change_supersedes_the_parked_move_which_keeps_its_layout_and_is_answered_once():
    controller, group, plane = parked(polls=1000, wait_steps=3)
    request = plane.request(Relayout(reason="operator", layout=Layout(fsdp=2)))
    tick_until(controller, lambda c: type(c.state).__name__ == "Preparing")
    controller.submit(PhaseChange(reason="rollout begins", phase="rollout"))
    states = tick_until(controller, lambda c: c.group.placement.layout == Layout(fsdp=2))
    assert states == ["Preparing", "Planning", "Preparing", "Resharding", "Running"]
    assert len(plane.answers[request]) == 1 and plane.answers[request][0].startswith("moved to fsdp=2")
    finish(controller)
    assert_exactly_once(controller, group)


def test_a_newer_request_supersedes_the_parked_one_and_both_get_its_answer():
    controller, group, plane = parked(polls=1000, wait_steps=3, workers=4, layout="dp=4")
    first = plane.request(Relayout(reason="operator", layout=Layout(fsdp=2)))
    tick_until(controller, lambda c: type(c.state).__name__ == "Preparing")
    second = plane.request(Relayout(reason="operator", layout=Layout(dp=2, fsdp=2)))
    tick_until(controller, lambda c: c.reshards)
    assert group.placement.layout == Layout(dp=2, fsdp=2)
    assert plane.answers[first] == plane.answers[second] and len(plane.answers[first]) == 1
    finish(controller)
    assert_exactly_once(controller, group)


def test_a_loss_cancels_the_parked_move_and_tells_its_requests_why():
    controller, group, plane = parked(polls=1000, workers=3, layout="dp=3")
    request = plane.request(Relayout(reason="operator", layout=Layout(fsdp=3)))
    tick_until(controller, lambda c: type(c.state).__name__ == "Preparing")
    group.faults.kill_at(2, phase="step")
    states = tick_until(controller, lambda c: c.recoveries)
    assert states[-4:] == ["Preparing", "Recovering", "Resharding", "Running"]
    assert plane.answers[request] == ["cancelled: workers [2] were lost first; the job recovers, then ask again "
                                      "if it still applies"]
    assert controller.recoveries[0]["how"] == "replicas" and 2 not in group.placement.workers
    finish(controller)
    assert len(plane.answers[request]) == 1
    assert_exactly_once(controller, group)


def test_the_parked_requests_are_told_when_every_step_is_done_first():
    controller, group, plane = parked(polls=1000, steps=6)
    request = plane.request(Relayout(reason="operator", layout=Layout(fsdp=2)))
    finish(controller)
    assert plane.answers[request] == ["not moved to fsdp=2: every step is done"]
    assert group.placement.layout == Layout(dp=2)
    assert_exactly_once(controller, group)


def test_max_workers_caps_every_request_for_more():
    controller, group, plane = make(max_workers=3)
    tick_until(controller, at_step(2))
    too_many = plane.request(AddWorkers(reason="lots of capacity", count=100))
    tick_until(controller, at_step(3))
    assert plane.answers[too_many] == ["refused: adding 100 workers would make 102, above control.max_workers=3; "
                                       "add at most 1; training continues on dp=2"]
    plane.request(SetBudget(reason="the cluster grew", workers=100))  # a budget from a source is capped
    tick_until(controller, at_step(5))
    assert controller.wishes.budget == 3 and len(group.live()) == 3
    assert RecordKind.SCALE_OUT in kinds(controller)
    with pytest.raises(ValueError, match="runtime.workers=2 exceeds control.max_workers=1"):
        make(max_workers=1, min_workers=1)


def test_a_recovery_from_replicas_calibrates_the_cost_model_like_any_reshard():
    controller, group, _ = make(layout="dp=2")
    seen = []
    original = controller.cost.observe_reshard
    controller.cost.observe_reshard = lambda *args: (seen.append(args), original(*args))
    group.faults.kill_at(1, step=3, phase="step")
    tick_until(controller, lambda c: c.recoveries)
    assert len(seen) == 1 and controller.reshards[-1].reason == "recover from the loss of workers [1]"


@pytest.mark.parametrize("event, words", [
    (AddWorkers(reason="x", count=-2), "the number of workers to add must be a positive whole number, got -2"),
    (AddWorkers(reason="x", count=0), "must be a positive whole number, got 0"),
    (SetBudget(reason="x", workers=2.5), "the worker budget must be a positive whole number, got 2.5"),
    (Drain(reason="x", worker="3"), "a worker id must be a whole number >= 0, got '3'"),
    (Relayout(reason="x", layout="dp=2"), "a relayout needs a Layout, got 'dp=2'"),
])
def test_a_malformed_request_gets_one_line_and_changes_nothing(event, words):
    controller, group, plane = make()
    tick_until(controller, at_step(2))
    before = (controller.wishes.budget, set(controller.wishes.draining), group.placement)
    request = plane.request(event)
    tick_until(controller, at_step(4))
    assert len(plane.answers[request]) == 1 and words in plane.answers[request][0]
    assert plane.answers[request][0].startswith("refused: ")
    assert (controller.wishes.budget, set(controller.wishes.draining), group.placement) == before
