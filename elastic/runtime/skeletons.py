"""A worker's engine skeletons: placements it may train on next, built and kept without storage.

A skeleton is a placement's process groups (``parallel/groups.LayoutGroups``) and an ``Engine`` built with
``skeleton=True``: module, tensor-parallel and FSDP wrapping, mesh and optimizer structure, no parameter or
optimizer storage. Three kinds live here, keyed by placement:

- the *next* placement, built in the background (``build``) as soon as the driver knows it, so that the
  reshard's stall is the transfer plus a bind;
- the *fallback* placements the job would move to if one worker died, built the same way after every move,
  so that a recovery from replicas does not wait for a rebuild;
- *recent* placements, parked when the job moved on (``Engine.park``), so that A -> B -> A rebuilds nothing.

At most ``limit`` are kept (least recently used leave first). A skeleton whose placement names a lost worker
can never be used (its groups have a dead member) and is dropped with ``forget_workers``; so is one whose
placement never happens, when it is evicted. Dropping destroys the skeleton's groups and nothing else.

Thread model: ``build`` runs on the worker's background thread, everything else on its compute thread;
the table is guarded by a lock. The driver settles every build before a reshard, so ``take`` never meets one
still being built.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from elastic.core.config import Config
from elastic.core.layout import Placement
from elastic.runtime.engine import Engine
from elastic.runtime.parallel.groups import LayoutGroups

log = logging.getLogger(__name__)


def _return_freed_memory() -> None:
    """Hand the build's freed heap back to the OS. Building allocates every local shard once (FSDP's set-up
    needs real storage) before the skeleton drops it; glibc keeps such freed memory in the build thread's
    arena, so without this a storage-free skeleton would still show as resident memory."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass(frozen=True)
class BuildOrder:
    """The driver's order to build ``placement``'s skeleton with its groups named ``group`` (``Worker.build``).
    Only ``driver/builds.py`` makes these: it alone schedules builds (an import contract)."""

    placement: Placement
    group: str


@dataclass
class Skeleton:
    placement: Placement
    groups: LayoutGroups | None  # None for a one-rank placement
    engine: Engine

    def close(self) -> None:
        self.engine.close()
        if self.groups is not None:
            self.groups.close()


class SkeletonCache:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._ready: OrderedDict[Placement, Skeleton] = OrderedDict()
        self._building: dict[Placement, threading.Event] = {}

    def name_of(self, placement: Placement) -> str | None:
        """The group-set name of the skeleton held for ``placement`` ("" for a one-rank one), None if none.

        The members of a placement must bind skeletons of one group set or none: the driver compares the names
        they report before it commits (a worker may have evicted its copy, or hold an older build)."""
        with self._lock:
            s = self._ready.get(placement)
        if s is None:
            return None
        return "" if s.groups is None else s.groups.name

    def placements(self) -> list[Placement]:
        with self._lock:
            return list(self._ready)

    def discard_group(self, name: str) -> bool:
        """Drop the skeleton whose groups are the set ``name`` (they were cut, so it can never train); whether
        there was one."""
        with self._lock:
            doomed = [p for p, s in self._ready.items() if s.groups is not None and s.groups.name == name]
            dropped = [self._ready.pop(p) for p in doomed]
        for s in dropped:
            s.close()
        return bool(dropped)

    # ---- building (background thread) -----------------------------------------------------------
    def build(self, cfg: Config, order: BuildOrder, rank: int, form_groups) -> dict:
        """Build ``order.placement``'s skeleton for ``rank`` with groups named ``order.group`` (``form_groups()``
        forms them),
        unless it is held under that name already. One held under another name is replaced: every member of
        the placement is building this one, and they must end up holding the same group set.

        Returns the seconds spent forming groups and building (zeros when it was already there).
        """
        placement, name = order.placement, order.group
        with self._lock:
            held = self._ready.get(placement)
            if self.limit == 0 or placement in self._building or (
                    held is not None and (held.groups is None or held.groups.name == name)):
                return {"group": 0.0, "build": 0.0, "cached": True}
            stale = self._ready.pop(placement, None)
            done = self._building[placement] = threading.Event()
        if stale is not None:
            stale.close()
        groups = None
        try:
            started = time.perf_counter()
            groups = form_groups() if placement.layout.world > 1 else None
            formed = time.perf_counter()
            if groups is None:
                engine = Engine(cfg, placement, rank, None, skeleton=True)
            else:
                with groups.as_default_here():
                    engine = Engine(cfg, placement, rank, groups.mesh, skeleton=True)
            _return_freed_memory()
            seconds = {"group": formed - started, "build": time.perf_counter() - formed, "cached": False}
            self.put(Skeleton(placement, groups, engine))
            return seconds
        except BaseException:
            if groups is not None:
                groups.close()
            raise
        finally:
            with self._lock:
                self._building.pop(placement, None)
            done.set()

    # ---- using (compute thread) -------------------------------------------------------------------
    def take(self, placement: Placement, name: str | None) -> Skeleton | None:
        """Remove and return ``placement``'s skeleton if it is the group set ``name`` (as ``name_of`` reports);
        with any other name (None: the members did not all hold it) it is dropped, and None returned."""
        with self._lock:
            s = self._ready.pop(placement, None)
        if s is None:
            return None
        if name is not None and name == ("" if s.groups is None else s.groups.name):
            return s
        s.close()
        return None

    def put(self, skeleton: Skeleton) -> None:
        """Keep ``skeleton`` (most recently used); evict beyond the limit."""
        evicted = []
        with self._lock:
            old = self._ready.pop(skeleton.placement, None)
            if old is not None:
                evicted.append(old)
            self._ready[skeleton.placement] = skeleton
            while len(self._ready) > self.limit:
                evicted.append(self._ready.popitem(last=False)[1])
        for s in evicted:
            s.close()

    def forget_workers(self, workers: set[int]) -> list[Placement]:
        """Drop every skeleton whose placement names one of ``workers`` (lost: its groups cannot work)."""
        with self._lock:
            doomed = [p for p in self._ready if set(p.workers) & workers]
            dropped = [self._ready.pop(p) for p in doomed]
        for s in dropped:
            # Closed, not cut: the dead peer's listening ports may already serve another process's new group,
            # and cutting by them would sever that group's connections.
            s.close()
        return doomed

    def clear(self) -> None:
        with self._lock:
            dropped = list(self._ready.values())
            self._ready.clear()
        for s in dropped:
            s.close()
