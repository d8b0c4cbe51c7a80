"""Background builds of engine skeletons: the next placement, the fallbacks, one at a time.

``Builds.ask`` queues placements whose skeletons the workers should build on their build thread while
training goes on (``Worker.build``; ``runtime/skeletons.py``). One build runs at a time, the newest ask
first, and the next is sent when the driver next looks (``done``, or after a step): Ray does not keep the
order of calls to a threaded actor, and two builds that two members started in different orders would wait
on each other's rendezvous.

Before any group-forming call (a setup, a transfer, a restore) the caller ``settle``s the builds: a worker
forms one group set at a time. A build that needs a lost worker is called off through the store and not
waited for; the others are; a build not made only means that its placement is built when it is used.
This is the only module that starts builds: an
import contract lets no other driver or control module import ``runtime.skeletons`` (its ``BuildOrder``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import ray

from elastic.core.layout import Placement
from elastic.driver.calls import Calls
from elastic.driver.group import WorkerFailure
from elastic.driver.membership import Membership
from elastic.runtime.skeletons import BuildOrder

log = logging.getLogger(__name__)


class Builds:
    def __init__(self, members: Membership, calls: Calls, next_group: Callable[[], str]) -> None:
        self.members, self.calls, self.next_group = members, calls, next_group
        self._running: dict[str, tuple[Placement, dict[int, ray.ObjectRef]]] = {}  # group name -> its build
        self._queued: list[Placement] = []
        calls.on_lost.append(self.forget)

    def ask(self, placements: Iterable[Placement]) -> None:
        """Queue these placements' builds (the newest ask first); one asked for already is not built twice."""
        fresh = [p for p in dict.fromkeys(placements)
                 if p not in self._queued and not any(p == q for q, _ in self._running.values())]
        self._queued[0:0] = fresh  # a planned move goes before the fallbacks asked earlier
        self.pump()

    def done(self, placement: Placement) -> bool:
        """Whether no build of ``placement`` is queued or still running (built, failed or never asked)."""
        self.pump()
        if placement in self._queued:
            return False
        return all(self._finished(refs) for p, refs in self._running.values() if p == placement)

    def _abandon_lost(self) -> None:
        """Call off and forget builds that need a lost worker. They are not waited for: a member may be inside
        gloo's connect to the dead peer, which no store key interrupts and which gives up only after gloo's own
        timeout; its build thread is busy until then, and nothing else waits on it."""
        for name, (placement, _) in list(self._running.items()):
            if any(w not in self.members.actors for w in placement.workers):
                self.calls.call_off(name)
                del self._running[name]
                log.info("skeleton of %s called off: a member was lost", placement.layout)

    def pump(self) -> None:
        """Send the next queued build once the one in flight (if any) has finished."""
        self._abandon_lost()
        for _, refs in self._running.values():
            if not self._finished(refs):
                return
        while self._queued:
            placement = self._queued.pop(0)
            if any(w not in self.members.actors or w in self.members.starting for w in placement.workers):
                continue
            name = self.next_group()
            order = BuildOrder(placement, name)
            self._running[name] = (placement, {w: self.members.actors[w].build.remote(order)
                                               for w in placement.workers})
            return

    def settle(self) -> None:
        """Wait for the builds still running and drop the queued ones (the placement they were for may not
        happen). Raises ``WorkerFailure`` if a worker died meanwhile: the caller must hear of it."""
        lost = {}
        self._queued.clear()
        self._abandon_lost()
        for name, (placement, refs) in list(self._running.items()):
            try:  # every member is alive: the build finishes (a member lost meanwhile calls it off, see forming)
                self.calls.gather(refs, members=list(refs), forming=name, phase="build", settle=False)
            except WorkerFailure as failure:
                log.info("skeleton of %s not built: %s", placement.layout, failure)
                lost.update(failure.dead)
            del self._running[name]
        if lost:
            raise WorkerFailure(lost, {})

    def forget(self, dead: set[int]) -> None:
        """Call off builds that need a lost worker, and have the others drop skeletons naming it."""
        for name, (placement, _) in self._running.items():
            if dead & set(placement.workers):
                self.calls.call_off(name)
        for w, actor in self.members.actors.items():
            if w not in dead:
                actor.forget_workers.remote(sorted(dead))

    @staticmethod
    def _finished(refs: dict[int, ray.ObjectRef]) -> bool:
        done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=0)
        return len(done) == len(refs)
