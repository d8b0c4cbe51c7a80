"""What a person sees of a run: the progress bar, and one log line per event printed above it.

The bar (tqdm) and the controller's log lines share stderr. ``logging_redirect_tqdm`` sends log
records through ``tqdm.write``, which clears the bar, prints the line and redraws the bar below it.

Ray prints a multi-line banner ("A worker died or was killed while executing a task ...", with the
worker's ids and the usual causes) on the driver's stdout for every worker process that dies, from a
background thread that no Ray setting turns off. The controller already reports each loss on one line
(which worker, and what the job did about it), so ``configure_logging`` drops Ray's banner from stdout;
everything else passes through unchanged.
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


# A workload's metrics the bar shows, when a step has them (TRL's names; GRPO's reward, its KL with beta > 0).
SHOWN = ("reward", "kl")


def describe(summary) -> dict:
    """The bar's postfix for a StepSummary: loss, tokens/s, workers, layout, and the workload's ``SHOWN`` metrics."""
    out = {"loss": f"{summary.loss:.3f}", "tok/s": f"{summary.tokens / max(summary.seconds, 1e-9):,.0f}",
           "workers": summary.workers, "layout": summary.layout}
    metrics = getattr(summary, "metrics", {})
    out.update({name: f"{metrics[name]:.3f}" for name in SHOWN if name in metrics})
    return out


@contextlib.contextmanager
def log_above_bar(enabled: bool = True) -> Iterator[None]:
    """While the block runs, log records of the ``elastic`` loggers print above the progress bar."""
    if not enabled:
        yield
        return
    with logging_redirect_tqdm(loggers=[logging.getLogger("elastic")]):
        yield


RAY_DEATH_BANNER = "A worker died or was killed while executing a task"


class _WithoutRayBanners:
    """A stdout that drops Ray's worker-death banner (one ``print`` call: the text, then its newline)."""

    def __init__(self, stream) -> None:
        self._stream, self._drop_newline = stream, False

    def write(self, text: str) -> int:
        if RAY_DEATH_BANNER in text:
            self._drop_newline = True
            return len(text)
        if self._drop_newline and text == "\n":
            self._drop_newline = False
            return len(text)
        self._drop_newline = False
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def configure_logging(debug: bool = False) -> None:
    """What the CLI and examples show: one line per controller event (INFO), tracebacks with ``debug``,
    and no Ray worker-death banners (``debug`` keeps them)."""
    if not debug and not isinstance(sys.stdout, _WithoutRayBanners):
        sys.stdout = _WithoutRayBanners(sys.stdout)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if not debug else "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("elastic")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
