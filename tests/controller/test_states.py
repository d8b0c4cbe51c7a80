"""The controller's transition table: the module docstring's diagram says the same, edge by edge, and a
transition outside the table raises."""

from __future__ import annotations

import pytest

from elastic.control import states
from elastic.control.states import TRANSITIONS, Done, IllegalTransition, Paused, Planning, Running, Transition

NAMES = {cls.__name__: cls for cls in states.STATES}


def diagram_edges() -> set[tuple[type, type]]:
    """(source, target) for every arrow of the docstring's diagram, parsed from the text itself.

    A line with ``->`` whose left side names a state starts that state's arrows; a line whose left side is
    blank continues the source above it. The target is the first word after the arrow.
    """
    edges, source = set(), None
    for line in states.__doc__.splitlines():
        left, arrow, right = line.partition("->")
        if not arrow:
            continue
        if left.strip():
            source = NAMES[left.strip()]
        edges.add((source, NAMES[right.split()[0]]))
    return edges


def test_the_diagram_shows_exactly_the_table():
    table = {(src, dst) for src, targets in TRANSITIONS.items() for dst in targets}
    drawn = diagram_edges()
    assert drawn == table, f"in the table only: {table - drawn}; in the diagram only: {drawn - table}"


def test_the_docstring_diagram_is_the_one_rendered_from_the_table():
    """After changing EDGES, `python -m elastic.control.states` prints the text to paste."""
    assert states.diagram() in states.__doc__


def test_every_state_has_a_row_and_done_is_terminal():
    assert set(TRANSITIONS) == set(states.STATES) and TRANSITIONS[Done] == frozenset()


def test_an_illegal_transition_raises_naming_the_allowed_ones():
    assert Transition(Running(), Planning()).check().changes_state
    with pytest.raises(IllegalTransition, match="Paused -> Running is not a transition.*Paused, Planning"):
        Transition(Paused("x"), Running()).check()
    with pytest.raises(IllegalTransition, match="nothing \\(terminal\\)"):
        Transition(Done("x"), Planning()).check()
