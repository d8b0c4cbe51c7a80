"""Run in a subprocess by test_node_loss.py: whole Ray nodes die under a job, as preempted VMs do.

Ray's ``cluster_utils.Cluster`` starts real raylets on this machine. The head node (where this driver runs)
and one more node hold two workers each (0.5 CPU per node, 0.25 per worker). ``remove_node(node,
allow_graceful=False)`` then kills the second node with its raylet, object store and workers at once.

- ``fsdp=4`` with the default settings (no replica: auto snapshots, held off-node): the job must recover once
  from the newest snapshot, replay at most one snapshot interval, and end at the reference weights.
- ``dp=2,fsdp=2`` on a fresh node: the replicas sit on different nodes, so it recovers with no step replayed.

Prints one JSON line per job.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import sys
import tempfile
import threading
import time

import ray
from ray.cluster_utils import Cluster

from elastic.control.controller import Controller
from elastic.control.run import with_control
from tests import helpers
from tests.helpers import tiny_config, worst_state_err
from tests.reference import train_reference

STEPS, KILL_AT = 12, 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cluster: Cluster, node, layout: str, run_dir: str) -> dict:
    """Train ``layout`` on four workers, two per node; kill ``node`` (not the driver's) at step KILL_AT."""
    cfg = tiny_config(steps=STEPS, global_batch=8, dtype="float64")
    cfg = cfg.replace(runtime=dataclasses.replace(cfg.runtime, workers=4, cpus_per_worker=0.5))
    cfg = with_control(cfg, layout=layout, objective="use_all", poll_interval_s=0.1)
    controller = Controller(cfg, progress=False, run_dir=run_dir)
    outcome: dict = {}

    def train():
        try:
            outcome["result"] = controller.run()
        except BaseException as err:  # reported by the main thread
            outcome["error"] = err

    thread = threading.Thread(target=train, daemon=True)  # Ray's remove_node must run on the main thread
    thread.start()
    try:
        while controller.step < KILL_AT and thread.is_alive():
            time.sleep(0.01)
        placement = controller.group.placement
        nodes = controller.group.nodes()
        on_node = sorted(w for w in placement.workers if nodes.get(w) == node.node_id)
        killed_at, kill_step = time.perf_counter(), controller.step
        cluster.remove_node(node, allow_graceful=False)
        # remove_node takes a while to kill the raylet and its workers, and the job may commit steps meanwhile.
        gone_step = controller.step
        thread.join(timeout=240)
    finally:
        controller.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    helpers.assert_exactly_once(result.history, cfg.train.steps, cfg.train.global_batch, cfg.data.num_samples)
    err, name = worst_state_err(result.tensors, train_reference(cfg).tensors)
    recovered = [e for e in result.events if e["kind"] == "recovered"]
    failures = [e for e in result.events if e["kind"] == "failure"]
    notice = controller.journal.started + failures[0]["time"] - killed_at if failures else None
    return {"layout": layout, "killed_workers": on_node, "err": err, "err_tensor": name, "notice_s": notice,
            "recoveries": [{k: e[k] for k in ("text", "steps_lost", "how")} for e in recovered],
            "failures": [e["text"] for e in failures], "node": node.node_id[:8],
            "placement_nodes": [nodes.get(w, "")[:8] for w in placement.workers],
            "events": [e.get("text", "") for e in result.events], "kill_step": kill_step, "gone_step": gone_step}


def main() -> None:
    # Explicit agent ports: the test session's own Ray holds the default (52365), and a Ray agent that
    # cannot bind takes its raylet, and every worker on it, down.
    head = {"num_cpus": 1, "dashboard_agent_listen_port": free_port()}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        for layout in ("fsdp=4", "dp=2,fsdp=2"):
            node = cluster.add_node(num_cpus=1, dashboard_agent_listen_port=free_port())
            cluster.wait_for_nodes()
            out = run(cluster, node, layout, tempfile.mkdtemp(prefix="elastic-nodes-"))
            print("RESULT " + json.dumps(out), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
