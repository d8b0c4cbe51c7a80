"""Calls to worker actors that fail fast on a death and never on slow work.

A training step is a set of calls blocked in each other's collectives. ``Calls.gather`` waits for every
answer:

- When a worker dies or fails, it cuts the other members' gloo connections of the group set the calls use
  (``Worker.abort`` with that set's name: a late abort can never cut a set formed afterwards, such as a
  recovery's), and calls off a rendezvous being formed (the store's abort key), so no survivor waits out
  a timeout; then it raises ``WorkerFailure`` naming the culprits.
- A worker on a node Ray reports dead is dead, and so is every other worker on that node, in the same
  failure: a node loss is one event. A worker Ray cannot reach on a live node is killed and counted dead
  (it is cut off, and must not come back as a second copy of its ranks).
- No fixed timeout ends a call. Each window (``deadlines.py``: a few times the slowest recent call of the
  phase) the busy workers are probed; the ones the verdict names hung are killed (``ray.kill``) and the call
  fails as if they had crashed. Otherwise the call goes on.

Workers found dead are forgotten (``Membership.lost``) and the ``on_lost`` listeners hear of them (the
build scheduler drops builds that needed them). Assumes ``ray.init`` has been called.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import ray
import torch
import torch.distributed as dist
from ray.exceptions import (
    ActorUnavailableError,
    GetTimeoutError,
    OutOfMemoryError,
    RayActorError,
    RayError,
    RayTaskError,
)

from elastic.core.config import RuntimeConfig
from elastic.driver.deadlines import Deadlines, Look, verdict
from elastic.driver.group import WorkerFailure
from elastic.driver.membership import Membership
from elastic.runtime.failures import StepFailed
from elastic.runtime.parallel.store import abort_key

log = logging.getLogger(__name__)
REABORT_EVERY_S = 1.0  # how often a failing gather cuts the gloo groups of members that have not answered


def tensor_bytes(value: Any, depth: int = 3) -> int:
    """Bytes of the tensors in a call's result (in dicts, lists and tuples, ``depth`` levels down): what the
    driver received, counted so that a test can show an export never brought the state here."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if depth and isinstance(value, dict):
        return sum(tensor_bytes(v, depth - 1) for v in value.values())
    if depth and isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v, depth - 1) for v in value)
    return 0


class Calls:
    def __init__(self, members: Membership, store: dist.Store, runtime: RuntimeConfig) -> None:
        self.members, self.store = members, store
        self.on_lost: list[Callable[[set[int]], None]] = []
        self.received_bytes = 0  # tensor bytes in every result received (``tensor_bytes``)
        self.configure(runtime)

    def configure(self, runtime: RuntimeConfig) -> None:
        """Take a run's deadline settings; durations measured for another run are forgotten."""
        self.deadlines = Deadlines(runtime.deadline_factor, runtime.deadline_floor_s)
        self.ping_timeout_s = runtime.ping_timeout_s

    def ping(self, workers: Iterable[int]) -> dict[int, dict]:
        """Each worker's identity (id, pid, host, node), asked now: a check that the workers still answer."""
        workers = list(workers)
        return self.gather({w: self.members.actors[w].info.remote() for w in workers}, members=workers, phase="ping")

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
               forming: str | None = None, phase: str = "call", predicted: float | None = None,
               settle: bool = True) -> dict[int, Any]:
        """Wait for every call; on the first failure cut the other ``members``' group sets ``cut`` (the ones the
        calls use) so nobody stays blocked. ``forming``: the group set these calls form (its rendezvous is called
        off, and it is cut too). ``phase`` names the kind of call for its deadlines; ``predicted``: the cost
        model's guess of its duration, used until the phase has been measured. ``settle=False``: after the
        first failure, stop waiting for the other calls (background work nothing else waits on)."""
        members, started = list(members), time.monotonic()
        cut = [name for name in (*cut, forming) if name]
        window = self.deadlines.window(phase, predicted)
        log.debug("%s on workers %s: first look after %.1f s", phase, sorted(calls), window)
        look_at, before, hung = started + window, {}, {}
        pending = {ref: w for w, ref in calls.items()}
        results, dead, failed, details = {}, {}, {}, {}
        aborted, first = False, None
        while pending:
            wait = REABORT_EVERY_S if aborted else max(0.0, look_at - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait)
            if not ready:
                busy = sorted(pending.values())
                if aborted:  # a member that entered a collective after the first cut may hold fresh connections
                    self.abort(busy, cut)
                    continue
                before, found = self._look(busy, before, finished=len(pending) < len(calls))
                hung.update(found)
                if not found:
                    log.info("%s still running after %.0f s on workers %s; every one answers", phase,
                             time.monotonic() - started, busy)
                look_at = time.monotonic() + window
                continue
            wid = pending.pop(ready[0])
            outcome = self._outcome(ready[0])
            if outcome[0] == "ok":
                results[wid] = outcome[1]
                self.received_bytes += tensor_bytes(outcome[1])
            elif outcome[0] == "dead":
                dead[wid] = hung.get(wid, outcome[1])
            elif outcome[0] == "unreachable":  # its node is gone (a death), or it is cut off (killed: a hang)
                if not self.members.dead_nodes([wid]):
                    self.members.kill_hung(wid)
                dead[wid] = outcome[1]
            else:
                failed[wid], details[wid] = outcome[1], outcome[2]
            if (dead or failed) and not settle:
                if forming is not None:
                    self.call_off(forming)
                return self._conclude(phase, started, results, dead, failed, details, wid)
            if (dead or failed) and not aborted:
                aborted, first = True, wid
                if forming is not None:  # release peers still waiting in the group's rendezvous
                    self.call_off(forming)
                self.abort([w for w in members if w not in dead and w in self.members.actors], cut)
        return self._conclude(phase, started, results, dead, failed, details, first)

    def _conclude(self, phase: str, started: float, results: dict, dead: dict, failed: dict, details: dict,
                  first: int | None) -> dict:
        if dead:
            dead.update(self._node_mates(dead))
            self.members.lost(dead)
            for listener in self.on_lost:
                listener(set(dead))
        if dead or failed:
            raise WorkerFailure(dead, failed, details, first=first)
        self.deadlines.observe(phase, time.monotonic() - started)
        return results

    def _look(self, busy: list[int], before: dict[int, Look], finished: bool) -> tuple[dict[int, Look], dict]:
        """Probe the busy workers; kill the hung ones. Returns (this look, {hung worker: why})."""
        refs = {w: self.members.actors[w].probe.remote() for w in busy if w in self.members.actors}
        answered, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.ping_timeout_s)
        looks: dict[int, Look | None] = {}
        now = time.monotonic()
        for w, ref in refs.items():
            try:
                state = ray.get(ref) if ref in answered else None
            except RayError:  # it died meanwhile: its call will say so
                continue
            looks[w] = None if state is None else Look(state["in_collective"], state["cpu_seconds"], state["tasks"],
                                                       now)
        hung = verdict(looks, before, finished)
        for w, why in hung.items():
            log.warning("worker %d is hung (%s): killing it", w, why)
            self.members.kill_hung(w)
        seen = {w: look for w, look in looks.items() if look is not None}
        return seen, {w: f"hung: {why}" for w, why in hung.items()}

    def _node_mates(self, dead: dict[int, str]) -> dict[int, str]:
        """The other workers of the dead ones' nodes that died with them: those of a node Ray reports dead, and
        those that do not answer a probe right away (Ray may learn of a lost node seconds after its workers'
        calls fail). A node loss is then one failure, not one per worker."""
        nodes = self.members.nodes()
        suspect = {nodes[w] for w in dead if w in nodes}
        mates = [w for w, node in nodes.items() if node in suspect and w not in dead and w in self.members.actors]
        if not mates:
            return {}
        gone = self.members.dead_nodes(dead)
        out = {w: f"its node {nodes[w][:8]} died" for w in mates if nodes[w] in gone}
        refs = {w: self.members.actors[w].info.remote() for w in mates if w not in out}
        answered, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.ping_timeout_s)
        for w, ref in refs.items():
            try:
                if ref in answered:
                    ray.get(ref)
                    continue
            except RayError:
                pass
            out[w] = f"its node {nodes[w][:8]} died (no answer after worker {min(dead)} on it was lost)"
            self.members.kill_hung(w)
        return out

    @staticmethod
    def _outcome(ref: ray.ObjectRef) -> tuple:
        """("ok", value), ("dead", why) or ("failed", why, traceback) for one finished call."""
        try:
            return "ok", ray.get(ref)
        except ActorUnavailableError as err:
            return "unreachable", f"unreachable ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
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
