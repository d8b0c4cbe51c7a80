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

import gc
import logging
import os
import socket
import sys
import threading
import time

import ray
import torch

from elastic.config import Config
from elastic.engine import Engine, StepResult
from elastic.layout import Placement
from elastic.parallel import mesh as meshlib

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

    # ---- identity -----------------------------------------------------------------------
    def info(self) -> dict:
        return {"id": self.id, "pid": os.getpid(), "host": socket.gethostname(),
                "node_id": ray.get_runtime_context().get_node_id()}

    # ---- groups and engines -------------------------------------------------------------
    def _store(self):
        return meshlib.store_client(*self.store_addr, self.cfg.runtime.store_timeout_s)

    def setup(self, placement: Placement, group: str, state: dict[str, torch.Tensor] | None = None,
              step: int = 0, cfg: Config | None = None) -> float:
        """Join ``placement``'s group as this worker's rank and build an engine (from init or ``state``).

        ``cfg`` replaces the worker's config (a pool of workers can serve several runs in turn).
        """
        started = time.perf_counter()
        self._drop_engine()
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
        self.engine = Engine(self.cfg, placement, rank, mesh, state=state, step=step)
        self.placement = placement
        return time.perf_counter() - started

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

    def _drop_engine(self) -> None:
        with self._lock:
            if self.engine is not None:
                self.engine.close()
            self.engine = None
            meshlib.leave_default_group()
            gc.collect()

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
