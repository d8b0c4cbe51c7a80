"""Run in a subprocess by test_cluster_triggers.py: a real multi-node Ray cluster on one machine.

Ray's ``cluster_utils.Cluster`` starts real raylet processes. The job starts on the head node's
capacity; adding a node must make the controller scale out with no operator action. Then Ray is told the
node will be preempted (the GCS ``DrainNode`` call autoscalers make, with a deadline): the job must move off
it live before the deadline, so that removing the node afterwards costs nothing (no failure, no replay).
Prints one JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

from elastic.control.controller import Controller
from elastic.control.events import Stop
from elastic.control.run import with_control
from elastic.control.states import Running
from elastic.driver.ray_compat import drain_node
from tests.helpers import tiny_config, worst_state_err
from tests.reference import train_reference


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DRAIN_DEADLINE_S = 60


def main() -> None:
    # Explicit agent ports: the test session's own Ray holds the default (52365), and a Ray agent
    # that cannot bind takes its raylet, and every worker on it, down.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "dashboard_agent_listen_port": free_port()})
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    cfg = tiny_config(steps=100_000, global_batch=8, dtype="float64")
    cfg = cfg.replace(runtime=dataclasses.replace(cfg.runtime, workers=4, cpus_per_worker=0.25))
    cfg = with_control(cfg, watch_cluster=True, max_workers=8, objective="use_all", poll_interval_s=0.2,
                       snapshot_every=5)
    controller = Controller(cfg, progress=False)
    timeline: dict = {}
    outcome: dict = {}

    def train():
        try:
            outcome["result"] = controller.run()
        except BaseException as err:  # reported by the main thread
            outcome["error"] = err

    # Ray's add_node must run on the main thread, so training runs on another one.
    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    try:
        while controller.step < 5 and thread.is_alive():
            time.sleep(0.05)
        timeline["add_node"] = controller.step
        node = cluster.add_node(num_cpus=1, dashboard_agent_listen_port=free_port())
        # Four workers warming on the new node took 90 s on a machine at load 20+ (the scale-out then never
        # happened): wait for it as long as the test can, the assertions then say what did not.
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline and thread.is_alive():
            placement = controller.group.placement
            if placement is not None and len(placement.workers) == 8 and isinstance(controller.state, Running):
                break
            time.sleep(0.1)
        timeline["scaled_out"] = controller.step
        # Train a couple of steps on the new layout before the drain (a fixed sleep was shorter than one
        # dp=8 step when the suite loads both cores, and the history then had no dp=8 step at all).
        deadline, train_until = time.monotonic() + 60, controller.step + 2
        while controller.step < train_until and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.05)
        timeline["drain_node"] = controller.step
        drain_node(cluster.address, node.node_id, deadline_s=DRAIN_DEADLINE_S)
        deadline = time.monotonic() + DRAIN_DEADLINE_S
        while time.monotonic() < deadline and not any(e["kind"] == "drained" for e in controller.events):
            time.sleep(0.05)
        timeline["drained_s"] = DRAIN_DEADLINE_S - (deadline - time.monotonic())
        timeline["remove_node"] = controller.step
        cluster.remove_node(node)  # at (or before) the deadline, as the autoscaler does
        deadline = time.monotonic() + 90
        stop_at = controller.step + 5
        while controller.step < stop_at and time.monotonic() < deadline:
            time.sleep(0.05)
        controller.submit(Stop(reason="scenario done"))
        thread.join(timeout=120)
    finally:
        controller.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    # The run stopped early: its reference is the single-process run of as many steps (same schedule).
    steps = len(result.history)
    ref_state = train_reference(cfg, steps=steps).tensors
    err, name = worst_state_err(result.tensors, ref_state)
    out = {"events": [{k: v for k, v in e.items() if isinstance(v, (str, int, float, list))} for e in result.events],
           "layouts": sorted({(h.layout, h.workers) for h in result.history}),
           "timeline": timeline, "deadline_s": DRAIN_DEADLINE_S, "err": err, "err_tensor": name,
           "steps": len(result.history)}
    print("RESULT " + json.dumps(out))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
