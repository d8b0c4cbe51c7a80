"""The real peers side by side: torchrun, Ray Train v2 and this project, on the same model, batch and machine.

Two scenarios, each run for each system in a subprocess of its own (its own Ray cluster, or none):

- **kill**: 4 workers train data-parallel (a replica on every worker); during step 6 one worker process
  (not rank 0) gets a SIGKILL. Reported: seconds from the kill to training again (the first step that
  begins after it), to the killed step done, and the steps redone. torchrun and Ray Train restart every
  worker from the newest DCP checkpoint (written every 4 steps); the project recovers live from replicas.
- **scale**: training on 2 workers; after step 3 capacity for 2 more appears (a second torchrun agent
  joining the rendezvous; a second Ray node). Reported: seconds from that moment to the first step done on
  4 workers.

The peers run ``bench/peers_train.py`` (DDP over gloo, the project's 25m model, global batch 8 x 64). The
torchrun agent's restarts reuse the rendezvous store port and fail on this machine (pytorch#135712); the
documented workaround, ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, is set. Needs ``pip install -e '.[bench]'``
(Ray Train). About 6 minutes. Never fails on timing.

    python bench/peers.py              # everything, then the table
    python bench/peers.py --only torchrun-kill     # one run (prints its result as JSON)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KILL_STEP, SCALE_AFTER, CKPT_EVERY = 6, 3, 4
TRAIN = [str(ROOT / "bench/peers_train.py"), "--model", "25m", "--batch", "8", "--seq", "64",
         "--ckpt-every", str(CKPT_EVERY)]
RUNS = ("torchrun-kill", "torchrun-scale", "raytrain-kill", "raytrain-scale", "elastic-kill", "elastic-scale")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(path: Path, test, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in read_log(path):
            if test(entry):
                return entry
        time.sleep(0.02)
    raise TimeoutError(f"{path}: the awaited event did not come within {timeout:.0f} s")


def victim_pid(log: Path) -> int:
    """The pid of the newest rank-1 process of the run."""
    return read_log(Path(f"{log}.rank1"))[-1]["pid"]


def kill_figures(log: Path, killed_at: float) -> dict:
    events = read_log(log)
    again = next(e for e in events if e["event"] == "begin" and e["time"] > killed_at)
    done = next(e for e in events if e["event"] == "end" and e["step"] == KILL_STEP and e["time"] > killed_at)
    return {"again": again["time"] - killed_at, "done": done["time"] - killed_at, "redone": KILL_STEP - again["step"]}


def kill_during_step(log: Path) -> float:
    wait_for(log, lambda e: e["event"] == "begin" and e["step"] == KILL_STEP)
    time.sleep(0.2)
    os.kill(victim_pid(log), signal.SIGKILL)
    return time.time()


# ---- torchrun ----------------------------------------------------------------------------------

def torchrun(nnodes: str, nproc: int, port: int, log: Path, ckpt: Path) -> subprocess.Popen:
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1")
    cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=peers", "--max-restarts=3",
           "--monitor-interval=0.5", *TRAIN, "--ckpt-dir", str(ckpt), "--step-log", str(log)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen, marker: Path) -> None:
    """Kill a torchrun agent's process group, then every worker whose command line names ``marker``.

    torchrun's agent starts its workers in sessions of their own, so killing the agent's group alone
    leaves workers that keep training (and skew every later benchmark on this machine).
    """
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    subprocess.run(["pkill", "-9", "-f", str(marker)], check=False)


def run_torchrun_kill(tmp: Path) -> dict:
    log, proc = tmp / "log", torchrun("1", 4, free_port(), tmp / "log", tmp / "ckpt")
    try:
        killed = kill_during_step(log)
        wait_for(log, lambda e: e["event"] == "end" and e["step"] == KILL_STEP and e["time"] > killed)
        return kill_figures(log, killed)
    finally:
        stop(proc, tmp)


def run_torchrun_scale(tmp: Path) -> dict:
    port, log = free_port(), tmp / "log"
    first = torchrun("1:2", 2, port, log, tmp / "ckpt")
    second = None
    try:
        wait_for(log, lambda e: e["event"] == "end" and e["step"] == SCALE_AFTER)
        added = time.time()
        second = torchrun("1:2", 2, port, log, tmp / "ckpt")
        grown = wait_for(log, lambda e: e["event"] == "end" and e["world"] == 4 and e["time"] > added, timeout=300)
        return {"scale": grown["time"] - added}
    finally:
        stop(first, tmp)
        if second is not None:
            stop(second, tmp)


# ---- Ray Train v2 --------------------------------------------------------------------------------

def ray_train(tmp: Path, workers, cluster) -> object:
    """A TorchTrainer on ``workers`` (an int, or (min, max) for elastic resizing), fit in a thread."""
    import threading

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    sys.path.insert(0, str(ROOT / "bench"))
    from peers_train import arguments, loop

    args = arguments([*TRAIN[1:], "--ckpt-dir", str(tmp / "ckpt"), "--step-log", str(tmp / "log")])
    trainer = TorchTrainer(lambda: loop(args, ray_train=True),
                           scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(storage_path=str(tmp / "storage"),
                                                failure_config=FailureConfig(max_failures=3)))
    thread = threading.Thread(target=trainer.fit, daemon=True)
    thread.start()
    return thread


def run_raytrain_kill(tmp: Path) -> dict:
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray_train(tmp, 4, None)
    log = tmp / "log"
    killed = kill_during_step(log)
    wait_for(log, lambda e: e["event"] == "end" and e["step"] == KILL_STEP and e["time"] > killed)
    return kill_figures(log, killed)


def run_raytrain_scale(tmp: Path) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "dashboard_agent_listen_port": free_port()})
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    ray_train(tmp, (2, 4), cluster)  # room for 2 workers of 0.5 CPU each, until the second node comes
    log = tmp / "log"
    wait_for(log, lambda e: e["event"] == "end" and e["step"] == SCALE_AFTER)
    added = time.time()
    assert all(e["world"] == 2 for e in read_log(log) if e["event"] == "end"), "Ray Train started on more than 2"
    cluster.add_node(num_cpus=1, dashboard_agent_listen_port=free_port())
    grown = wait_for(log, lambda e: e["event"] == "end" and e["world"] == 4 and e["time"] > added, timeout=300)
    return {"scale": grown["time"] - added}


# ---- this project ------------------------------------------------------------------------------

def elastic_config(workers: int):
    from elastic.core.config import MODEL_PRESETS, Config, DataConfig, OptimConfig, RuntimeConfig, TrainConfig

    return Config(model=MODEL_PRESETS["25m"], data=DataConfig(dataset="stdlib", seq_len=64, max_corpus_bytes=1_000_000),
                  train=TrainConfig(steps=10_000, global_batch=8, dtype="float32"),
                  optim=OptimConfig(lr=1e-4, warmup_steps=0),
                  runtime=RuntimeConfig(workers=workers, cpus_per_worker=0.5, collective_timeout_s=300))


def run_elastic_kill(tmp: Path) -> dict:
    import threading

    from elastic.control.controller import Controller
    from elastic.control.events import Stop
    from elastic.control.run import with_control
    from elastic.control.states import Running
    from elastic.core.layout import Layout
    from elastic.driver.connect import connect_ray

    connect_ray(num_cpus=4)
    controller = Controller(with_control(elastic_config(4), layout=Layout(dp=4), objective="use_all"),
                            progress=False, gather_tensors=False)
    killed = {}

    def chaos():
        while controller.step < KILL_STEP or not isinstance(controller.state, Running):
            time.sleep(0.002)
        time.sleep(0.2)
        killed["at"] = time.perf_counter()
        controller.group.kill(controller.group.placement.workers[1])
        while not any(h.step == KILL_STEP and h.ended > killed["at"] for h in controller.history):
            time.sleep(0.01)
        controller.submit(Stop(reason="benchmark done"))

    thread = threading.Thread(target=chaos, daemon=True)
    try:
        controller.start()
        thread.start()
        result = controller.run_started()
    finally:
        controller.shutdown()
    after = [h for h in result.history if h.ended > killed["at"]]
    again = min(after, key=lambda h: h.ended)
    done = next(h for h in result.history if h.step == KILL_STEP)
    return {"again": again.ended - again.seconds - killed["at"], "done": done.ended - killed["at"],
            "redone": KILL_STEP - again.step}


def run_elastic_scale(tmp: Path) -> dict:
    import threading

    import ray
    from ray.cluster_utils import Cluster

    from elastic.control.controller import Controller
    from elastic.control.events import Stop
    from elastic.control.run import with_control
    from elastic.core.layout import Layout

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "dashboard_agent_listen_port": free_port()})
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    cfg = with_control(elastic_config(2), layout=Layout(dp=2), objective="use_all", watch_cluster=True,
                       max_workers=4, poll_interval_s=0.2)
    controller = Controller(cfg, progress=False, gather_tensors=False)
    out = {}

    def train():
        out["result"] = controller.run()

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    try:
        while controller.step < SCALE_AFTER + 1:
            time.sleep(0.01)
        added = time.perf_counter()
        cluster.add_node(num_cpus=1, dashboard_agent_listen_port=free_port())  # Ray's add_node: main thread
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not any(h.workers == 4 for h in controller.history):
            time.sleep(0.01)
        grown = next(h for h in controller.history if h.workers == 4)
        controller.submit(Stop(reason="benchmark done"))
        thread.join(timeout=120)
    finally:
        controller.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return {"scale": grown.ended - added}


def run_one(name: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"elastic-peers-{name}-") as tmp:
        return globals()[f"run_{name.replace('-', '_')}"](Path(tmp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=RUNS)
    args = parser.parse_args()
    if args.only:
        print("RESULT " + json.dumps(run_one(args.only)))
        return
    from rich.console import Console
    from rich.table import Table

    results = {}
    for name in RUNS:
        env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_TRAIN_V2_ENABLED="1")
        proc = subprocess.run([sys.executable, __file__, "--only", name], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=900)
        subprocess.run(["pkill", "-9", "-f", "peers_train.py"], check=False)  # nothing outlives its run
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        results[name] = json.loads(lines[-1][7:]) if lines else {"error": (proc.stderr.strip().splitlines()
                                                                            or ["no output"])[-1][:120]}
        print(f"  {name}: {results[name]}", flush=True)
    table = Table(title="Peers on the same machine (25m model, DDP-equivalent data parallel, batch 8 x 64)")
    for col in ("system", "SIGKILL -> training again s", "x", "SIGKILL -> killed step done s", "x",
                "steps redone", "capacity added -> first step on 4 workers s", "x"):
        table.add_column(col, justify="left" if col == "system" else "right")
    ours_kill, ours_scale = results["elastic-kill"], results["elastic-scale"]

    def ratio(theirs: dict, ours: dict, key: str) -> str:
        return f"{theirs[key] / ours[key]:.1f}" if key in theirs and key in ours and ours[key] > 0 else "-"

    for system, label in (("torchrun", "torchrun (elastic agent, DCP checkpoints)"),
                          ("raytrain", "Ray Train v2 (TorchTrainer, DCP checkpoints)"), ("elastic", "this project")):
        k, s = results[f"{system}-kill"], results[f"{system}-scale"]
        table.add_row(label, f"{k.get('again', float('nan')):.2f}", ratio(k, ours_kill, "again"),
                      f"{k.get('done', float('nan')):.2f}", ratio(k, ours_kill, "done"), str(k.get("redone", "-")),
                      f"{s.get('scale', float('nan')):.2f}", ratio(s, ours_scale, "scale"))
    Console(width=170).print(table)
    print(f"x: the peer's seconds over this project's, measured in this same run. Kill during step {KILL_STEP}; "
          f"peers checkpoint every {CKPT_EVERY} steps (DCP) and restart every worker from the newest; this project "
          "recovers from the surviving replicas without restarting the survivors. torchrun runs with "
          "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (pytorch#135712).")
    for name, r in results.items():
        if "error" in r:
            print(f"{name} failed: {r['error']}")


if __name__ == "__main__":
    main()
