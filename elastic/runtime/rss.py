"""A worker process's resident memory: now, and its peak since the last reset (Linux's VmHWM).

The planner's memory model is calibrated from the peak a worker reaches during a call above its idle RSS
(``plan/memory.py``). Linux keeps one high-water mark per process and lets the process reset it (writing 5 to
``/proc/self/clear_refs``), so each call's own peak is read, not the largest since the process began. Where
that file cannot be written or read (not Linux), ``getrusage``'s lifetime peak is all there is: ``peak``
then reports it only when the call raised it, and 0 (not known) otherwise. Pure Python, no torch.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

STATUS, CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _status(key: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0]) * 1024
    except OSError:
        return None
    return None


def current() -> int:
    """Resident bytes now (0 if not known)."""
    return _status("VmRSS") or 0


def _lifetime_peak() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


class PeakWatch:
    """The peak resident bytes of the process between ``start`` and ``peak``."""

    def __init__(self) -> None:
        self._reset, self._before = False, 0

    def start(self) -> None:
        try:
            CLEAR.write_text("5")
            self._reset = _status("VmHWM") is not None
        except OSError:
            self._reset = False
        self._before = 0 if self._reset else _lifetime_peak()

    def peak(self) -> int:
        """Peak bytes since ``start``; 0 when it cannot be told (no reset, and the lifetime peak did not move)."""
        if self._reset:
            return _status("VmHWM") or 0
        after = _lifetime_peak()
        return after if after > self._before else 0
