"""Calls to worker actors that fail fast: wait for every answer, and on the first failure release the rest.

A training step is a set of calls blocked in each other's collectives. When one worker dies or fails,
``Calls.gather`` cuts the other members' gloo connections of the group set the calls use (``Worker.abort``
with that set's name: a late abort can then never cut a set formed afterwards, such as a recovery's), and
calls off a rendezvous being formed (the store's abort key), so no survivor waits out a timeout; then it
raises ``WorkerFailure`` naming the culprits. Workers found dead are forgotten
(``Membership.lost``) and the ``on_lost`` listeners hear of them (the build scheduler drops builds that
needed them).

Assumes ``ray.init`` has been called.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import ray
import torch.distributed as dist
from ray.exceptions import GetTimeoutError, OutOfMemoryError, RayActorError, RayError, RayTaskError

from elastic.driver.group import WorkerFailure
from elastic.driver.membership import Membership
from elastic.runtime.failures import StepFailed
from elastic.runtime.parallel.store import abort_key

REABORT_EVERY_S = 1.0  # how often a failing gather cuts the gloo groups of members that have not answered


class Calls:
    def __init__(self, members: Membership, store: dist.Store, timeout_s: float) -> None:
        self.members, self.store, self.timeout_s = members, store, timeout_s
        self.on_lost: list[Callable[[set[int]], None]] = []

    def ping(self, workers: Iterable[int]) -> dict[int, dict]:
        """Each worker's identity (id, pid, host, node), asked now: a check that the workers still answer."""
        workers = list(workers)
        return self.gather({w: self.members.actors[w].info.remote() for w in workers}, members=workers)

    def call_off(self, group: str) -> None:
        """Call off forming the group ``group``: members waiting in its rendezvous fail at once."""
        self.store.set(abort_key(group), "1")

    def abort(self, workers: Iterable[int], cut: Iterable[str]) -> None:
        """Cut ``workers``' connections of the group sets named ``cut``."""
        for w in workers:
            actor = self.members.actors.get(w)
            if actor is not None:
                for name in cut:
                    actor.abort.remote(name)

    def gather(self, calls: dict[int, ray.ObjectRef], members: Iterable[int] = (), cut: Iterable[str] = (),
               timeout: float | None = None, forming: str | None = None) -> dict[int, Any]:
        """Wait for every call; on the first failure cut the other ``members``' group sets ``cut`` (the ones the
        calls use) so nobody stays blocked. ``forming``: the group set these calls form (its rendezvous is called
        off, and it is cut too)."""
        members = list(members)
        cut = [name for name in (*cut, forming) if name]
        timeout = timeout or self.timeout_s
        deadline = time.monotonic() + timeout
        pending = {ref: w for w, ref in calls.items()}
        results, dead, failed, details = {}, {}, {}, {}
        aborted = False
        while pending:
            left = deadline - time.monotonic()
            # Once aborting, re-send the abort every second: a member that entered a collective after
            # the first cut may have opened fresh gloo connections that the first cut did not see.
            wait = min(left, REABORT_EVERY_S) if aborted else left
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, wait))
            if not ready:
                waiting = sorted(pending.values())
                if aborted and left > REABORT_EVERY_S:
                    self.abort(waiting, cut)
                    continue
                self.abort(waiting, cut)
                raise WorkerFailure({}, {w: f"no answer within {timeout:.0f} s" for w in waiting})
            wid = pending.pop(ready[0])
            outcome = self._outcome(ready[0])
            if outcome[0] == "ok":
                results[wid] = outcome[1]
            elif outcome[0] == "dead":
                dead[wid] = outcome[1]
            else:
                failed[wid], details[wid] = outcome[1], outcome[2]
            if (dead or failed) and not aborted:
                aborted = True
                if forming is not None:  # release peers still waiting in the group's rendezvous
                    self.call_off(forming)
                self.abort([w for w in members if w not in dead and w in self.members.actors], cut)
        if dead:
            self.members.lost(dead)
            for listener in self.on_lost:
                listener(set(dead))
        if dead or failed:
            raise WorkerFailure(dead, failed, details)
        return results

    @staticmethod
    def _outcome(ref: ray.ObjectRef) -> tuple:
        """("ok", value), ("dead", why) or ("failed", why, traceback) for one finished call."""
        try:
            return "ok", ray.get(ref)
        except (RayActorError, OutOfMemoryError) as err:  # Ray's memory monitor kills the process
            return "dead", f"process died ({type(err).__name__})"
        except RayTaskError as err:
            cause = err.cause if isinstance(err.cause, Exception) else err
            if isinstance(cause, StepFailed):
                return "failed", str(cause), cause.detail
            return "failed", f"{type(cause).__name__}: {cause}", str(err)
        except GetTimeoutError:
            return "failed", "timed out", ""
        except RayError as err:
            return "failed", f"{type(err).__name__}: {str(err).splitlines()[0][:300]}", ""
