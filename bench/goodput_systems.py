"""The three systems ``bench/goodput.py`` compares, each run under a trace, and the capacity each one sees.

- ``run_elastic``: this project through its command line, on ``cluster_utils`` nodes;
- ``run_raytrain``: Ray Train v2's ``TorchTrainer`` (elastic, preemption handling), on the same kind of nodes;
- ``run_torchrun``: torchrun elastic agents, one per node.

Each returns the steps its rank 0 (or driver) logged and the restarts it went through, in seconds from its
first step (``drive``). Capacity objects (``RayNodes``, ``TorchrunAgents``) carry a trace's events out:
``notice`` (a preemption's warning), ``lose`` (the node dies) and ``add`` (capacity returns).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from goodput_trace import TraceEvent

ROOT = Path(__file__).resolve().parents[1]

BATCH, SEQ, CKPT_EVERY = 8, 64, 10
STORE_BYTES = 1024**3  # per node; cluster_utils' default (150 MiB) is far below any real node's
TRAIN = [str(ROOT / "bench/peers_train.py"), "--model", "25m", "--batch", str(BATCH), "--seq", str(SEQ),
         "--ckpt-every", str(CKPT_EVERY)]
SYSTEMS = ("elastic", "raytrain", "torchrun")
LABELS = {"elastic": "this project (CLI, defaults)", "raytrain": "Ray Train v2 (elastic, preemption handling)",
          "torchrun": "torchrun elastic (DCP)"}



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return rows


class Log:
    """A system's step log, read as (step, begin, end, world, loss) in absolute times, plus its restarts."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path, self.kind = path, kind

    def steps(self) -> list[dict]:
        rows = read_jsonl(self.path)
        if self.kind == "elastic":  # metrics.jsonl: one row per committed step, when it ended
            return [{"step": r["step"], "begin": r["at"] - r["seconds"], "end": r["at"], "world": r["workers"],
                     "loss": r["loss"]} for r in rows if "at" in r]
        begun: dict[int, dict] = {}
        out = []
        for r in rows:
            if r["event"] == "begin":
                begun[r["step"]] = r
            elif r["event"] == "end" and r["step"] in begun:
                out.append({"step": r["step"], "begin": begun.pop(r["step"])["time"], "end": r["time"],
                            "world": r["world"], "loss": r["loss"]})
        return out

    def restarts(self) -> list[float]:
        if self.kind == "elastic":
            return []  # survivors never restart
        return [r["time"] for r in read_jsonl(self.path) if r["event"] == "resumed"][1:]  # the first is the start

    def first_begin(self, timeout_s: float = 600) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            steps = self.steps()
            if steps:
                return min(s["begin"] for s in steps)
            time.sleep(0.1)
        raise TimeoutError(f"{self.path}: no step within {timeout_s:.0f} s")


def play(trace: list[TraceEvent], t0: float, capacity, window_s: float) -> list[dict]:
    """Carry the trace out against ``capacity`` (notice / lose / add), at offsets from ``t0`` (time.time()),
    on this thread; returns what happened when."""
    done = []
    for event in trace:
        time.sleep(max(0.0, t0 + event.at - time.time()))
        if event.kind == "return":
            capacity.add()
        else:
            if event.notice:
                capacity.notice(event.notice)
                time.sleep(max(0.0, t0 + event.lost_at - time.time()))
            capacity.lose()
        done.append({"kind": event.kind, "at": time.time() - t0})
    time.sleep(max(0.0, t0 + window_s - time.time()))
    return done


# ---- Ray nodes (this project and Ray Train) -----------------------------------------------------------

class RayNodes:
    """A head node that stays and a spot node that comes and goes (``cluster_utils`` raylets)."""

    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True,
                               head_node_args={"num_cpus": 1, "dashboard_agent_listen_port": free_port(),
                                               "object_store_memory": STORE_BYTES})
        self.spot = None
        self.add()

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self) -> None:
        self.spot = self.cluster.add_node(num_cpus=1, dashboard_agent_listen_port=free_port(),
                                          object_store_memory=STORE_BYTES)
        self.cluster.wait_for_nodes()

    def notice(self, seconds: float) -> None:
        from elastic.driver.ray_compat import drain_node

        drain_node(self.address, self.spot.node_id, deadline_s=seconds)

    def lose(self) -> None:
        self.cluster.remove_node(self.spot, allow_graceful=False)
        self.spot = None

    def shutdown(self) -> None:
        self.cluster.shutdown()


def run_elastic(tmp: Path, trace: list[TraceEvent], window_s: float) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the bench's own loopback cluster
    nodes = RayNodes()
    run_dir = tmp / "run"
    command = [sys.executable, "-m", "launch", "train", "--recipe", "pretrain", "--model", "25m", "--workers", "4",
               "--steps", "100000", "--train.global_batch", str(BATCH), "--data.seq_len", str(SEQ),
               "--data.max_corpus_bytes", "1000000", "--optim.lr", "1e-4", "--optim.warmup_steps", "0",
               "--runtime.cpus_per_worker", "0.5", "--control.watch_cluster", "true", "--control.max_workers", "4",
               "--control.objective", "use_all", "--run-dir", str(run_dir), "--address", nodes.address,
               "--no-progress"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(tmp / "driver.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return drive(Log(run_dir / "metrics.jsonl", "elastic"), trace, nodes, window_s)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        nodes.shutdown()


def run_raytrain(tmp: Path, trace: list[TraceEvent], window_s: float) -> dict:
    import threading

    import ray
    from peers_train import arguments, loop
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    nodes = RayNodes()
    ray.init(address=nodes.address, logging_level="ERROR", log_to_driver=False)
    args = arguments([*TRAIN[1:], "--ckpt-dir", str(tmp / "ckpt"), "--step-log", str(tmp / "log"), "--preemption"])
    trainer = TorchTrainer(lambda: loop(args, ray_train=True),
                           scaling_config=ScalingConfig(num_workers=(2, 4), resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(storage_path=str(tmp / "storage"),
                                                failure_config=FailureConfig(max_failures=-1)))
    threading.Thread(target=trainer.fit, daemon=True).start()
    try:
        return drive(Log(tmp / "log", "raytrain"), trace, nodes, window_s)
    finally:
        ray.shutdown()
        nodes.shutdown()


class TorchrunAgents:
    """One permanent agent and a spot agent that comes and goes, two workers each, one rendezvous."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.port, self.count = tmp, free_port(), 0
        self.permanent = self._agent("permanent")
        self.spot = None
        self.add()

    def _agent(self, tag: str) -> subprocess.Popen:
        env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1")
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--nnodes=1:2", "--nproc-per-node=2",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{self.port}", "--rdzv-id=goodput",
               "--max-restarts=100", "--monitor-interval=0.5", *TRAIN, "--ckpt-dir", str(self.tmp / "ckpt"),
               "--step-log", str(self.tmp / "log"), "--node-tag", f"{self.tmp.name}-{tag}"]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)

    def add(self) -> None:
        self.count += 1
        self.spot = (self._agent(f"spot{self.count}"), f"{self.tmp.name}-spot{self.count}")

    def notice(self, seconds: float) -> None:
        pass  # torchrun has no preemption notice: the agent learns of it when its node dies

    def lose(self) -> None:
        proc, tag = self.spot
        kill_agent(proc, tag)
        self.spot = None

    def shutdown(self) -> None:
        kill_agent(self.permanent, f"{self.tmp.name}-permanent")
        if self.spot is not None:
            self.lose()
        subprocess.run(["pkill", "-9", "-f", str(self.tmp)], check=False)


def kill_agent(proc: subprocess.Popen, tag: str) -> None:
    """A node dying: the agent's process group, and its workers (torchrun starts them in sessions of their own)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    subprocess.run(["pkill", "-9", "-f", f"node-tag {tag}"], check=False)


def run_torchrun(tmp: Path, trace: list[TraceEvent], window_s: float) -> dict:
    agents = TorchrunAgents(tmp)
    try:
        return drive(Log(tmp / "log", "torchrun"), trace, agents, window_s)
    finally:
        agents.shutdown()


def drive(log: Log, trace: list[TraceEvent], capacity, window_s: float) -> dict:
    """Wait for the first step, play the trace, and return the steps and restarts relative to it."""
    t0 = log.first_begin()
    happened = play(trace, t0, capacity, window_s)
    steps = [{**s, "begin": s["begin"] - t0, "end": s["end"] - t0} for s in log.steps()]
    return {"steps": steps, "restarts": [r - t0 for r in log.restarts()], "happened": happened}
