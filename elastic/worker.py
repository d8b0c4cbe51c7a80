"""The Ray actor that hosts one worker: a thin shell over an Engine.

Each worker is a real OS process with a stable integer id. It joins one gloo group per
placement and keeps running across reshards. The actor is threaded (``max_concurrency``) so that
control calls (``abort``, ``pid``) are served while a training step is blocked in a collective.

Failure handling: when a step fails (a peer died, or the driver called ``abort``), the worker
drops every reference to its model, optimizer and process groups. Gloo closes a group's sockets
only when its last reference goes, and a closed socket is what releases the peers still blocked
on this worker, within milliseconds instead of a collective timeout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import threading
import time

import ray
import torch

from elastic.config import Config
from elastic.engine import DTYPE, Engine, StepResult
from elastic.layout import Placement
from elastic.parallel import mesh as meshlib
from elastic.reshard.execute import execute
from elastic.state import state_specs

log = logging.getLogger(__name__)


class StepFailed(RuntimeError):
    """A worker's step failed; ``worker`` names it and the message says why."""

    def __init__(self, worker: int, message: str) -> None:
        super().__init__(worker, message)  # args stay (worker, message) so the error pickles across Ray
        self.worker, self.message = worker, message

    def __str__(self) -> str:
        return f"worker {self.worker}: {self.message}"


@ray.remote(max_concurrency=8)
class Worker:
    def __init__(self, worker_id: int, cfg: Config, store_host: str, store_port: int) -> None:
        self.id, self.cfg = worker_id, cfg
        self.store_addr = (store_host, store_port)
        torch.set_num_threads(cfg.runtime.threads_per_worker)
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format=f"[worker {worker_id}] %(levelname)s %(name)s: %(message)s")
        self.engine: Engine | None = None
        self.placement: Placement | None = None
        self._lock = threading.Lock()
        self._step_lock = threading.Lock()
        self._aborted = False
        self._pending = None

    # ---- identity -----------------------------------------------------------------------
    def info(self) -> dict:
        return {"id": self.id, "pid": os.getpid(), "host": socket.gethostname(),
                "node_id": ray.get_runtime_context().get_node_id()}

    def warmup(self) -> dict:
        """Pay the one-off costs before this worker is needed: load the dataset, and run one step of a
        tiny model through tensor parallelism and FSDP on a private one-rank group, so the first real
        engine build and step are as fast as later ones. Returns ``info()``."""
        from elastic.parallel.warm import warm_up

        warm_up(self.cfg)
        return self.info()

    # ---- groups and engines -------------------------------------------------------------
    def _store(self):
        return meshlib.store_client(*self.store_addr, self.cfg.runtime.store_timeout_s)

    def setup(self, placement: Placement, group: str, state: dict[str, torch.Tensor] | None = None,
              step: int = 0, cfg: Config | None = None) -> dict[str, float]:
        """Join ``placement``'s group as this worker's rank and build an engine (from init or ``state``).

        ``cfg`` replaces the worker's config (a pool of workers can serve several runs in turn).
        Returns the seconds spent leaving the old group, forming the new one and building the engine.
        """
        started = time.perf_counter()
        self._drop_engine()
        left = time.perf_counter()
        if cfg is not None:
            self.cfg = cfg
        self._aborted = False
        rank = placement.rank_of(self.id)
        if rank is None:
            raise ValueError(f"worker {self.id} is not part of placement {placement}")
        mesh = None
        if placement.layout.world > 1:
            mesh = meshlib.form_layout_group(self._store(), group, rank, placement.layout,
                                             self.cfg.runtime.collective_timeout_s)
        formed = time.perf_counter()
        self.engine = Engine(self.cfg, placement, rank, mesh, state=state, step=step)
        self.placement = placement
        done = time.perf_counter()
        return {"leave": left - started, "group": formed - left, "engine": done - formed, "total": done - started}

    def train_step(self) -> StepResult:
        with self._step_lock:
            engine = self.engine
            if engine is None:
                raise StepFailed(self.id, "has no engine (never set up, or aborted)")
            try:
                return engine.train_step()
            except Exception as err:  # a dead peer, an abort, or a real bug: fail fast with the reason
                message = f"step {engine.step} failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
                err.__traceback__ = None
            del engine
            meshlib.abort_groups()  # peers blocked on us fail now, not after a timeout
            self._drop_engine()
            raise StepFailed(self.id, message)

    def abort(self) -> None:
        """Cut this worker's gloo connections, then drop its engine once no step is running."""
        self._aborted = True
        meshlib.abort_groups()
        if self._step_lock.acquire(timeout=self.cfg.runtime.collective_timeout_s):
            try:
                self._drop_engine()
            finally:
                self._step_lock.release()

    def cut_group(self, name: str) -> int:
        """Cut only the gloo group ``name`` (a reshard transfer): the engine and its group stay intact."""
        return meshlib.abort_groups(name)

    def _drop_engine(self) -> None:
        with self._lock:
            if self.engine is not None:
                self.engine.close()
            self.engine = None
            meshlib.leave_default_group()

    # ---- live reshard (two phases: transfer, then commit) ----------------------------------
    def reshard_transfer(self, old: Placement | None, new: Placement, work: list, movers: tuple[int, ...],
                         group: str, step: int) -> dict:
        """Phase 1: build this worker's new local tensors from the plan; the old engine keeps running state.

        ``work`` is this worker's (round, tag, transfer) list; ``movers`` the workers with remote
        transfers, who meet in a standalone gloo group named ``group``.
        """
        started = time.perf_counter()
        n_layers = self.cfg.model.n_layers
        specs = state_specs(self.cfg)
        old_rank = old.rank_of(self.id) if old is not None else None
        new_rank = new.rank_of(self.id)
        if old_rank is not None and self.engine is None:
            raise StepFailed(self.id, f"is in the old placement {old} but has no state to send")
        old_state = self.engine.local_state() if old_rank is not None else {}
        old_boxes = {} if old_rank is None else {
            s.name: b for s in specs if (b := old.box(s, old_rank, n_layers)) is not None}
        new_boxes = {} if new_rank is None else {
            s.name: b for s in specs if (b := new.box(s, new_rank, n_layers)) is not None}
        pg = None
        prepared = time.perf_counter()
        if self.id in movers:
            pg = meshlib.standalone_group(self._store(), group, movers.index(self.id), len(movers),
                                          self.cfg.runtime.collective_timeout_s)
        joined = time.perf_counter()
        if self.cfg.runtime.fault_delay_transfer_s and pg is not None:
            time.sleep(self.cfg.runtime.fault_delay_transfer_s)  # fault injection: widen the window for tests
        try:
            new_state, stats = execute(work, self.id, old_state, old_boxes, new_boxes, DTYPE[self.cfg.train.dtype],
                                       pg, {w: i for i, w in enumerate(movers)})
        except Exception as err:
            meshlib.abort_groups(group)
            raise StepFailed(self.id, f"reshard transfer failed: {type(err).__name__}: "
                                      f"{str(err).splitlines()[0][:300]}") from None
        finally:
            del pg
            meshlib.close_standalone(group)
        self._pending = (new, new_state, step) if new_rank is not None else None
        out = dataclasses.asdict(stats)
        out.update(prepare_seconds=prepared - started, group_seconds=joined - prepared,
                   wall_seconds=time.perf_counter() - started)
        return out

    def reshard_commit(self, group: str) -> float:
        """Phase 2: leave the old group, join the new placement's group and build the engine."""
        if self._pending is None:
            raise StepFailed(self.id, "has no transferred state to commit")
        new, state, step = self._pending
        self._pending = None
        return self.setup(new, group, state=state, step=step)

    def reshard_cancel(self) -> None:
        """Forget a transfer that will not be committed (the old engine was never touched)."""
        self._pending = None

    def release(self) -> None:
        """Leave training (drained): drop the engine and the groups; the actor can then be stopped."""
        self._drop_engine()

    # ---- state --------------------------------------------------------------------------
    def local_state(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(step, this worker's local tensors), copied so they can leave the process."""
        if self.engine is None:
            raise StepFailed(self.id, "has no engine to read state from")
        return self.engine.step, {k: v.clone() for k, v in self.engine.local_state().items()}

    def eval_loss(self, indices: list[int], split: str = "holdout") -> tuple[float, int]:
        return self.engine.eval_loss(indices, split)

    def shutdown(self) -> None:
        self._drop_engine()
        ray.actor.exit_actor()
