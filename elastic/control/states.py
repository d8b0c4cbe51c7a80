"""The controller's states (see ``controller.py`` for the transitions)."""

from __future__ import annotations

import enum


class State(enum.Enum):
    RUNNING = "running"
    PLANNING = "planning"
    RESHARDING = "resharding"
    PAUSED = "paused"
    RECOVERING = "recovering"
    DONE = "done"
