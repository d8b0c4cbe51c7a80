"""How a worker's failure travels to the driver: one line of reason, the traceback as detail.

``StepFailed`` is what a worker raises when a call fails (a dead peer, an abort, a real bug); the driver's
fail-fast calls (``driver/calls.py``) read it without importing the worker actor.
"""

from __future__ import annotations

import logging
import traceback

log = logging.getLogger(__name__)


class StepFailed(RuntimeError):
    """A worker's call failed; ``worker`` names it, the message says why, ``detail`` is the traceback."""

    def __init__(self, worker: int, message: str, detail: str = "") -> None:
        super().__init__(worker, message, detail)  # args stay (worker, message, detail): the error pickles
        self.worker, self.message, self.detail = worker, message, detail

    def __str__(self) -> str:
        return f"worker {self.worker}: {self.message}"


def first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"


def failure(worker: int, what: str, err: BaseException) -> StepFailed:
    """The error the driver sees: one line of reason, and the worker-side traceback as detail."""
    detail = "".join(traceback.format_exception(err))
    log.debug("worker %d: %s failed:\n%s", worker, what, detail)
    return StepFailed(worker, f"{what} failed: {first_line(err)}", detail)
