"""The controller's transition table: the module docstring's diagram says the same, edge by edge, and a
transition outside the table raises."""

from __future__ import annotations

import re

import pytest

from elastic.control import states
from elastic.control.states import TRANSITIONS, Done, IllegalTransition, Paused, Planning, Running, Transition

NAMES = {cls.__name__: cls for cls in states.STATES}


def diagram_edges() -> set[tuple[type, type]]:
    """(source, target) for every arrow of the docstring's diagram.

    A line that starts with state names followed by an arrow names its sources; a line that starts with
    ``|`` or ``\\`` continues the sources above it. The target is the first state name after the arrow.
    """
    edges, sources = set(), []
    for line in states.__doc__.splitlines():
        if ">" not in line:
            continue
        left, _, right = line.partition(">")
        target = re.match(r"\s*(\w+)\(", right)
        if target is None:
            continue
        names = re.findall(r"\b([A-Z]\w+)\b", left)
        if names:
            sources = [NAMES[n] for n in names]
        edges |= {(s, NAMES[target.group(1)]) for s in sources}
    return edges


def test_the_diagram_shows_exactly_the_table():
    table = {(src, dst) for src, targets in TRANSITIONS.items() for dst in targets}
    drawn = diagram_edges()
    assert drawn == table, f"in the table only: {table - drawn}; in the diagram only: {drawn - table}"


def test_every_state_has_a_row_and_done_is_terminal():
    assert set(TRANSITIONS) == set(states.STATES) and TRANSITIONS[Done] == frozenset()


def test_an_illegal_transition_raises_naming_the_allowed_ones():
    assert Transition(Running(), Planning()).check().changes_state
    with pytest.raises(IllegalTransition, match="Paused -> Running is not a transition.*Paused, Planning"):
        Transition(Paused("x"), Running()).check()
    with pytest.raises(IllegalTransition, match="nothing \\(terminal\\)"):
        Transition(Done("x"), Planning()).check()
