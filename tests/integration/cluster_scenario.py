"""Run in a subprocess by test_cluster_triggers.py: a real multi-node Ray cluster on one machine.

Ray's ``cluster_utils.Cluster`` starts real raylets. The job starts on the head node's capacity; adding a
node must make the controller scale out with no operator action. Then Ray is told the node will be preempted
(the GCS ``DrainNode`` call autoscalers make, with a deadline): the job must move off it live before the
deadline, so that removing the node afterwards costs nothing (no failure, no replay).

The job holds still while the cluster changes: a ``Hold`` source parks the controller between two steps while
Ray adds, drains or removes the node, and ``WaitForWorkers`` parks it while the new node's workers warm up.
So every change lands at a known step, the run needs a dozen steps rather than the ~150 it trained while
waiting, and its float64 weights stay within 1e-9 of the single-process reference. Prints one JSON line with
what the test checks: the journal, the layouts, the steps as the ranks reported them (the ledger) and the error.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

from elastic.control.controller import Controller
from elastic.control.run import with_control
from elastic.driver.ray_compat import drain_node, draining_nodes
from elastic.driver.ray_group import RayWorkerGroup
from tests.helpers import WaitForWorkers, tiny_config, worst_state_err
from tests.integration.background import free_port
from tests.reference import train_reference

STEPS, ADD_AT, DRAIN_DEADLINE_S = 12, 2, 60
# The job's first four workers took 145 s to warm up at load 40 (the group itself gives up after 240 s).
START_TIMEOUT_S = 300
# Four workers warming on the new node took 90 s on a machine at load 20+: the job waits for them this long,
# without training, and the test then says what did not happen.
WARM_TIMEOUT_S = 200


class Hold:
    """An event source that parks the controller between two steps while the scenario changes the cluster.

    ``advance(step)`` (scenario thread) lets a parked job go on and returns once its first poll at or after
    ``step`` is waiting; ``release()`` lets it go for good. It is polled before the cluster watchers, so what
    the scenario did while the job was parked is seen at that same step boundary."""

    def __init__(self) -> None:
        self.alive, self.cond = (lambda: True), threading.Condition()
        self.armed: int | None = None
        self.parked: int | None = None
        self.closed = False

    def poll(self, step: int) -> list:
        with self.cond:
            if self.armed is not None and step >= self.armed and not self.closed:
                self.armed, self.parked = None, step
                self.cond.notify_all()
                self.cond.wait_for(lambda: self.parked is None or self.closed, timeout=600)
        return []

    def advance(self, step: int, timeout_s: float = 120.0) -> int | None:
        """The step the job is parked at next, or None if it ended (or did not get there in ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            self.armed, self.parked = step, None
            self.cond.notify_all()
            while self.parked is None and self.alive() and time.monotonic() < deadline:
                self.cond.wait(timeout=0.5)
            self.armed = None
            return self.parked

    def release(self) -> None:
        with self.cond:
            self.closed, self.armed, self.parked = True, None, None
            self.cond.notify_all()


def scale_out(cluster: Cluster, controller: Controller, hold: Hold, timeline: dict):
    """Add a node while the job is parked at ADD_AT; then step it along until it trains on eight workers."""
    step = timeline["add_node"] = hold.advance(ADD_AT, timeout_s=START_TIMEOUT_S)
    if step is None:
        return None  # the job ended, or never started: the test says what did not happen
    started = time.monotonic()
    node = cluster.add_node(num_cpus=1, dashboard_agent_listen_port=free_port())
    cluster.wait_for_nodes()
    while ray.cluster_resources().get("CPU", 0) < 2 and time.monotonic() < started + 60:
        time.sleep(0.1)  # the watcher reads the node's CPUs at the boundary the job is parked at
    # The watcher asks for four more workers, WaitForWorkers holds the next boundary while they warm (no step
    # runs meanwhile, however long the machine's load makes it), then the job moves to dp=8 at the boundary
    # after. Each advance is one step boundary; the deadline covers the warm-up and a few steps.
    deadline = started + WARM_TIMEOUT_S + 60
    while step is not None and time.monotonic() < deadline:
        placement = controller.group.placement
        if placement is not None and len(placement.workers) == 8:
            break
        step = hold.advance(step + 1, timeout_s=max(0.0, deadline - time.monotonic()))
    timeline["scaled_out"], timeline["scale_out_s"] = step, round(time.monotonic() - started, 1)
    return node


def drain_and_remove(cluster: Cluster, node, hold: Hold, controller: Controller, timeline: dict) -> None:
    """Two steps on dp=8, then Ray's preemption notice while the job is parked; once the job reports the node's
    workers gone, remove the node (as the autoscaler does at or before the deadline) while it is parked again."""
    step = timeline["drain_node"] = hold.advance(timeline["scaled_out"] + 2)
    if step is None:
        return  # the job ended: the test says what did not happen
    started = time.monotonic()
    drain_node(cluster.address, node.node_id, deadline_s=DRAIN_DEADLINE_S)
    while node.node_id not in draining_nodes() and time.monotonic() < started + 30:
        time.sleep(0.1)  # the watchers read the notice at the boundary the job is parked at
    while step is not None and time.monotonic() < started + DRAIN_DEADLINE_S:
        step = hold.advance(step + 1, timeout_s=max(0.0, started + DRAIN_DEADLINE_S - time.monotonic()))
        if any(e["kind"] == "drained" for e in controller.events):
            break
    timeline["drained_s"] = round(time.monotonic() - started, 2)
    timeline["remove_node"] = step
    cluster.remove_node(node)


def report(cfg, result, timeline: dict) -> dict:
    """The RESULT line: the journal, layouts, every step once and every try (the ledger), the error."""
    ref_state = train_reference(cfg).tensors
    err, name = worst_state_err(result.tensors, ref_state)

    def steps(summaries):
        return [[h.step, list(h.samples)] for h in summaries]

    return {"events": [{k: v for k, v in e.items() if isinstance(v, (str, int, float, list))} for e in result.events],
            "layouts": sorted({(h.layout, h.workers) for h in result.history}),
            "history": steps(result.history), "tries": steps(result.tries), "recoveries": result.recoveries,
            "steps": cfg.train.steps, "batch": cfg.train.global_batch, "num_samples": cfg.data.num_samples,
            "timeline": timeline, "deadline_s": DRAIN_DEADLINE_S, "err": err, "err_tensor": name}


def main() -> None:
    began = time.monotonic()
    # Explicit agent ports: the test session's own Ray holds the default (52365), and a Ray agent
    # that cannot bind takes its raylet, and every worker on it, down.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "dashboard_agent_listen_port": free_port()})
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    cfg = tiny_config(steps=STEPS, global_batch=8, dtype="float64")
    cfg = cfg.replace(runtime=dataclasses.replace(cfg.runtime, workers=4, cpus_per_worker=0.25))
    cfg = with_control(cfg, watch_cluster=True, max_workers=8, objective="use_all", poll_interval_s=0.2,
                       snapshot_every=5)
    group = RayWorkerGroup(cfg)
    hold = Hold()
    controller = Controller(cfg, group, sources=[hold, WaitForWorkers(group, WARM_TIMEOUT_S)], progress=False)
    outcome: dict = {}
    # Ray's add_node and remove_node must run on the main thread, so training runs on another one.
    thread = threading.Thread(target=lambda: outcome.update(train(controller)), daemon=True)
    hold.alive = thread.is_alive
    timeline: dict = {}
    thread.start()
    try:
        node = scale_out(cluster, controller, hold, timeline)
        if timeline.get("scaled_out") is not None:
            drain_and_remove(cluster, node, hold, controller, timeline)
        hold.release()
        thread.join(timeout=300)
    finally:
        hold.release()
        controller.shutdown()
        group.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    timeline["seconds"] = round(time.monotonic() - began, 1)
    print("RESULT " + json.dumps(report(cfg, outcome["result"], timeline)), flush=True)
    ray.shutdown()
    cluster.shutdown()


def train(controller: Controller) -> dict:
    try:
        return {"result": controller.run()}
    except BaseException as err:  # reported by the main thread
        return {"error": err}


if __name__ == "__main__":
    sys.exit(main())
