"""What a worker's compute thread is doing, as its control thread can see it: the driver's hang probe.

A worker that stops answering is told apart from one that is slow by asking its control thread (which a
stopped process cannot answer) about the compute thread:

- ``in_collective``: whether the compute thread is inside communication code (torch's collectives, FSDP's and
  the pipeline's, our transfer and parallel layer), waiting on or exchanging with peers. A worker blocked
  there is a victim of whichever peer is not;
- ``cpu_seconds``: the CPU time the compute thread has used (Linux: ``/proc/self/task/<tid>/stat``), and
  ``tasks``: how many calls it has started. Working code burns CPU; a thread stuck in a blocking call (a hung
  read, a lock that never comes, a deadlock) burns none, and neither does one waiting on a peer.

The compute thread registers itself when a call starts (``ComputeThread.enter``). Stdlib only.
"""

from __future__ import annotations

import os
import sys
import threading

# Files whose frames mean "talking to peers". DTensor's dispatch (torch/distributed/tensor) is left out: under
# tensor parallelism most local compute runs through it.
_COMMUNICATION = ("distributed_c10d.py", "_functional_collectives", "_fsdp_collectives.py", "pipelining/",
                  "elastic/runtime/transfer.py", "elastic/runtime/parallel/")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def thread_cpu_seconds(native_id: int) -> float:
    """CPU seconds (user + system) thread ``native_id`` of this process has used; 0.0 where /proc is missing."""
    try:
        with open(f"/proc/self/task/{native_id}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime and stime: fields 14 and 15 of stat(5)


class ComputeThread:
    def __init__(self) -> None:
        self._ident: int | None = None
        self._native: int | None = None
        self._task, self._tasks = "", 0
        self._lock = threading.Lock()

    def enter(self, task: str) -> None:
        """Called by the compute thread when it starts a call."""
        with self._lock:
            self._ident, self._native, self._task = threading.get_ident(), threading.get_native_id(), task
            self._tasks += 1

    def probe(self) -> dict:
        """From any thread: {"task", "tasks", "in_collective", "cpu_seconds"} of the compute thread."""
        with self._lock:
            ident, native, tasks, task = self._ident, self._native, self._tasks, self._task
        # sys._current_frames is the documented way to read another thread's stack (faulthandler uses it).
        frame = sys._current_frames().get(ident) if ident is not None else None  # noqa: SLF001
        in_collective = False
        while frame is not None and not in_collective:
            in_collective = any(part in frame.f_code.co_filename for part in _COMMUNICATION)
            frame = frame.f_back
        cpu = thread_cpu_seconds(native) if native is not None else 0.0
        return {"task": task, "tasks": tasks, "in_collective": in_collective, "cpu_seconds": cpu}
