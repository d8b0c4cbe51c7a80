"""Failures the way clusters produce them, each against a quiet run of the same job.

One multi-node Ray cluster on this machine (``ray.cluster_utils``: a head node, where the driver runs, and a
second node; two workers on each). For each model (25m, 100m; 4 workers on fsdp=4, so no replica: the
default safety applies, auto snapshots held off-node and checkpoints in the run folder) it runs:

- quiet: the job with no failure (the weights and the step time the others are compared with);
- worker SIGKILL: one worker's process killed during step K;
- node loss: the second node removed ungracefully during step K (its raylet, object store and two workers);
- hang: one worker SIGSTOPped during step K, found by the default deadlines (a probe after the larger of
  60 s and 4x the slowest recent step; 10 s for the probe's answer);
- driver loss: the ``elastic train`` driver SIGKILLed after step K, then the same command run again.

Columns: time to notice (fault -> the failure recorded), time to training again (fault -> the end of the
first step computed after the recovery; for a lost driver, from the second command's start), steps redone,
MB moved between workers or read back (snapshot or checkpoint), final weights against the quiet run's (max
relative difference; float32, so summation order shows), and the run's wall time over the quiet run's.

Usage: python bench/failures.py [--models 25m,100m] [--steps 14] [--kill-at 8]   (about 25 minutes)
Never fails on timing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the bench's own cluster, on loopback: no token needed

import ray  # noqa: E402
import torch  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from elastic.control.controller import Controller  # noqa: E402
from elastic.control.run import with_control  # noqa: E402
from elastic.core import checkpoint as ckpt  # noqa: E402
from elastic.core.config import (  # noqa: E402
    MODEL_PRESETS,
    Config,
    DataConfig,
    OptimConfig,
    RuntimeConfig,
    TrainConfig,
)
from elastic.model.specs import training_specs  # noqa: E402
from elastic.tools.progress import configure_logging  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STORE_BYTES = 2 * 1024**3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(model: str, steps: int, batch: int, seq: int) -> Config:
    cfg = Config(model=MODEL_PRESETS[model],
                 data=DataConfig(dataset="stdlib", seq_len=seq, max_corpus_bytes=1_000_000),
                 train=TrainConfig(steps=steps, global_batch=batch, dtype="float32"),
                 optim=OptimConfig(lr=1e-4, warmup_steps=0), runtime=RuntimeConfig(workers=4, cpus_per_worker=0.5))
    return with_control(cfg, layout="fsdp=4", objective="use_all")


def rel(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-30))
               for k in b)


class Run:
    """One job under a controller on its own thread; ``fault(controller)`` is called at step ``kill_at``."""

    def __init__(self, cfg: Config, kill_at: int, fault=None) -> None:
        self.run_dir = tempfile.mkdtemp(prefix="elastic-bench-failures-")
        self.controller = Controller(cfg, progress=False, run_dir=self.run_dir)
        self.kill_at, self.fault, self.at = kill_at, fault, None

    def go(self) -> dict:
        c, out = self.controller, {}

        def train():
            try:
                out["result"] = c.run()
            except Exception as err:  # noqa: BLE001 - the job ended in an error: its row says which
                out["error"] = f"{type(err).__name__}: {err}"

        thread = threading.Thread(target=train, daemon=True)
        started = time.perf_counter()
        thread.start()
        if self.fault is not None:
            while c.step < self.kill_at and thread.is_alive():
                time.sleep(0.005)
            time.sleep(0.3 * statistics.median(h.seconds for h in c.history[1:]) if len(c.history) > 2 else 0.1)
            self.at = time.perf_counter()
            self.fault(c)  # on the main thread (Ray's remove_node must run there)
        thread.join()
        c.shutdown()
        if "error" in out:
            return {"error": out["error"]}
        return self.report(out["result"], time.perf_counter() - started)

    def report(self, result, wall: float) -> dict:
        c = self.controller
        failures = [e for e in result.events if e["kind"] == "failure"]
        recovered = [e for e in result.events if e["kind"] == "recovered"]
        row = {"wall": wall, "tensors": result.tensors,
               "step": statistics.median(h.seconds for h in result.history[1:])}
        if self.at is not None and failures and recovered:
            noticed = c.journal.started + failures[0]["time"]
            back_at = c.journal.started + recovered[0]["time"]
            first = min((h for h in result.history if h.ended > back_at), key=lambda h: h.ended)
            moved = sum(r.bytes_moved for r in result.reshards if r.reason.startswith("recover"))
            read_back = c.safe.snapshots.latest.nbytes if recovered[0]["how"].startswith("snapshot") else 0
            row.update(notice=noticed - self.at, back=first.ended - self.at, redone=recovered[0]["steps_lost"] + 1,
                       mb=(moved + read_back) / 1e6, recoveries=len(recovered))
        return row


def driver_loss(cfg: Config, model: str, address: str, kill_at: int, steps: int, batch: int, seq: int) -> dict:
    """The CLI's driver SIGKILLed after step ``kill_at`` (a checkpoint every 4 steps), then the command again."""
    storage = tempfile.mkdtemp(prefix="elastic-bench-driver-")
    command = [sys.executable, "-m", "launch", "train", "--recipe", "pretrain", "--model", model, "--steps", str(steps),
               "--workers", "4", "--layout", "fsdp=4", "--train.global_batch", str(batch), "--data.seq_len", str(seq),
               "--data.max_corpus_bytes", "1000000", "--optim.lr", "1e-4", "--optim.warmup_steps", "0",
               "--runtime.cpus_per_worker", "0.5", "--checkpoint-every", "4", "--job-name", "bench-driver",
               "--storage-path", storage, "--address", address, "--no-progress"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = Path(storage) / "bench-driver" / "metrics.jsonl"
    while first.poll() is None and (not metrics.exists() or metrics.read_text().count("\n") < kill_at + 1):
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    killed = time.perf_counter()
    first.wait()
    before = metrics.read_text().count("\n")
    again = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while again.poll() is None and metrics.read_text().count("\n") <= before:
        time.sleep(0.05)
    back = time.perf_counter() - killed
    again.wait()
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    redone = max(r["step"] for r in rows[:before]) + 1 - rows[before]["step"]  # the second run starts at its checkpoint
    root = Path(storage) / "bench-driver" / "checkpoints"
    final = ckpt.open_checkpoint(ckpt.latest(root), cfg, training_specs(cfg))
    wanted = {s.name: tuple((0, n) for n in s.shape) for s in training_specs(cfg)}
    tensors = ckpt.read_boxes(final, wanted, torch.float32)
    read = sum(f.stat().st_size for f in ckpt.latest(root).glob("*.safetensors"))  # the size of one checkpoint
    return {"back": back, "redone": redone, "mb": read / 1e6, "tensors": tensors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="25m,100m")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--kill-at", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    configure_logging()
    # 2 GiB object stores: cluster_utils' default of 150 MiB would spill every snapshot of these models to disk.
    head = {"num_cpus": 1, "dashboard_agent_listen_port": free_port(), "object_store_memory": STORE_BYTES}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    table = Table(title="Failures as clusters produce them (4 workers on two nodes, fsdp=4: no replica; default "
                        "safety), each against the quiet run of the same job")
    for col in ("model", "failure", "noticed after s", "training again after s", "steps redone", "MB moved / read",
                "max rel diff vs quiet", "wall / quiet"):
        table.add_column(col, justify="left" if col in ("model", "failure") else "right")
    errors: list[str] = []
    try:
        node = cluster.add_node(num_cpus=1, dashboard_agent_listen_port=free_port(), object_store_memory=STORE_BYTES)
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        for model in args.models.split(","):
            cfg = make_config(model, args.steps, args.batch, args.seq)
            quiet = Run(cfg, args.kill_at).go()
            table.add_row(model, "none (quiet run)", "-", "-", "0", "0", "0", "1.00")
            rows = {"worker SIGKILL": Run(cfg, args.kill_at, lambda c: c.group.kill(c.group.placement.workers[-1])),
                    "hang (SIGSTOP)": Run(cfg, args.kill_at, lambda c: os.kill(
                        c.group.pid(c.group.placement.workers[-1]), signal.SIGSTOP))}
            results = {name: run.go() for name, run in rows.items()}
            results["driver loss"] = driver_loss(cfg, model, cluster.address, args.kill_at, args.steps, args.batch,
                                                 args.seq)
            results["node loss"] = Run(cfg, args.kill_at,
                                       lambda c, lost=node: cluster.remove_node(lost, allow_graceful=False)).go()
            node = cluster.add_node(num_cpus=1, dashboard_agent_listen_port=free_port(),
                                    object_store_memory=STORE_BYTES)
            for name, r in results.items():
                nan = float("nan")
                if "error" in r:
                    table.add_row(model, name, "job failed", "-", "-", "-", "-", "-")
                    errors.append(f"{model} {name}: {r['error'][:300]}")
                    continue
                table.add_row(model, name, f"{r.get('notice', nan):.2f}", f"{r.get('back', nan):.2f}",
                              str(r.get("redone", "-")), f"{r.get('mb', 0):.0f}",
                              f"{rel(r['tensors'], quiet['tensors']):.1e}",
                              f"{r['wall'] / quiet['wall']:.2f}" if "wall" in r else "-")
            Console(width=160).print(table)
    finally:
        ray.shutdown()
        cluster.shutdown()
    for line in errors:
        print(f"job failed: {line}")
    print("noticed: the fault -> the failure in the job's journal. training again: the fault -> the end of the first "
          "step computed after the recovery (driver loss: the command run again at once). steps redone: the step the "
          "fault hit plus the replayed ones. MB: moved between workers by the recovery, or read back from a "
          "snapshot or checkpoint.")


if __name__ == "__main__":
    main()
