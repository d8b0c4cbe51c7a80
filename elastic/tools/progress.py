"""The progress bar of a run, and log lines that print above it instead of through it.

The bar (tqdm) and the controller's log lines share stderr. ``logging_redirect_tqdm`` sends log
records through ``tqdm.write``, which clears the bar, prints the line and redraws the bar below it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


def progress_bar(total: int, initial: int = 0, disable: bool = False) -> tqdm:
    return tqdm(total=total, initial=initial, disable=disable, unit="step", dynamic_ncols=True, file=sys.stderr,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")


def describe(summary) -> dict:
    """The bar's postfix for a StepSummary: loss, tokens/s, workers, layout."""
    return {"loss": f"{summary.loss:.3f}", "tok/s": f"{summary.tokens / max(summary.seconds, 1e-9):,.0f}",
            "workers": summary.workers, "layout": summary.layout}


@contextlib.contextmanager
def log_above_bar(enabled: bool = True) -> Iterator[None]:
    """While the block runs, log records of the ``elastic`` loggers print above the progress bar."""
    if not enabled:
        yield
        return
    with logging_redirect_tqdm(loggers=[logging.getLogger("elastic")]):
        yield


def configure_logging(debug: bool = False) -> None:
    """What the CLI and examples show: one line per controller event (INFO), tracebacks with ``debug``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if not debug else "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("elastic")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
