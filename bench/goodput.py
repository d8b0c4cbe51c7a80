"""Goodput under one preemption trace: this project, Ray Train v2 and torchrun, on the same capacity, in one run.

Every system trains the project's 25m model (global batch 8 x 64, AdamW at 1e-4, float32) on the same
capacity: a permanent node and a spot node with two workers each (0.5 CPU a worker; one machine of 2
cores), and lives through the same trace (``bench/goodput_trace.py``: preemptions with 30 s notice,
failures without one, capacity returning), at the same offsets from its own first step:

- **this project**, through its command line (``elastic train --address ...``) with the defaults, the
  cluster watcher on and ``objective=use_all`` (every system uses all the workers it has). Its nodes are
  ``cluster_utils`` raylets; a preemption is Ray's own notice (the GCS ``DrainNode`` call with the deadline,
  as autoscalers make it), then the node is removed ungracefully at the deadline; a failure removes it at
  once; a return adds a node.
- **Ray Train v2**: ``TorchTrainer`` with ``ScalingConfig(num_workers=(2, 4))`` (elastic),
  ``FailureConfig(max_failures=-1)``, a DCP checkpoint every ``CKPT_EVERY`` steps, and its preemption
  handling: the loop asks ``ray.train.get_preemption_info()`` after every step and checkpoints at once on a
  notice, as Ray's docs advise. Same nodes, same drain calls.
- **torchrun** elastic (``--nnodes 1:2``, two processes per agent, c10d rendezvous with its default timeouts,
  ``--max-restarts 100``, DCP every ``CKPT_EVERY`` steps): a node is an agent. torchrun has no preemption
  notice, so a preempted agent simply dies at its deadline (SIGKILL of the agent and its workers); a return
  starts a new agent.

Per system: ETTR (productive time over the window), goodput (samples of distinct steps per second), its ratio
to ours, steps replayed, seconds from each capacity change to the next step, the mean loss of the last five
steps inside the window (equal wall time), and the no-failure step time on the full capacity (measured in a
short run of each system first). A stacked timeline per system goes to ``bench/out/goodput.png``.

    python bench/goodput.py --quick     # one preemption, one failure, two returns; 3-minute windows (~20 min)
    python bench/goodput.py             # the seeded trace over 10-minute windows (~45 min)

Prints, never fails on its figures. Every process a system started is killed by its process group and
by its temp folder's name before the next system runs.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from goodput_trace import Step, TraceEvent, account, back_after, describe, make_trace, timeline  # noqa: E402

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


# ---- the table and the plot ---------------------------------------------------------------------------

def run_one(system: str, trace: list[TraceEvent], window_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"elastic-goodput-{system}-") as tmp:
        return globals()[f"run_{system}"](Path(tmp), trace, window_s)


def in_subprocess(system: str, trace: list[TraceEvent], window_s: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_TRAIN_V2_ENABLED="1")
    spec = json.dumps({"system": system, "window": window_s, "trace": [e.__dict__ for e in trace]})
    proc = subprocess.run([sys.executable, __file__, "--one", spec], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=window_s + 900)
    subprocess.run(["pkill", "-9", "-f", "elastic-goodput-"], check=False)  # nothing outlives its run
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:  # reported, and the other systems still run
        print(f"{system} failed:\n{proc.stderr[-3000:]}", flush=True)
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200], "steps": [], "restarts": []}
    return json.loads(lines[-1][len("RESULT "):])


def figures(raw: dict, trace: list[TraceEvent], window_s: float) -> dict:
    steps = [Step(**s) for s in raw["steps"]]
    out = account(steps, raw["restarts"], window_s, BATCH)
    out["back"] = back_after(steps, trace)
    return out


def plot(raws: dict, trace: list[TraceEvent], window_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"productive": "#2ca02c", "replaying": "#ff7f0e", "stalled": "#bbbbbb", "restarting": "#d62728"}
    fig, ax = plt.subplots(figsize=(11, 1.0 + 0.7 * len(raws)))
    for row, raw in enumerate(raws.values()):
        steps = [Step(**s) for s in raw["steps"]]
        for kind, a, b in timeline(steps, raw["restarts"], window_s):
            ax.broken_barh([(a, b - a)], (row - 0.35, 0.7), color=colors[kind])
    for e in trace:
        ax.axvline(e.lost_at, color="black", lw=0.8, ls="-" if e.kind != "return" else ":")
        if e.notice:
            ax.axvspan(e.at, e.lost_at, color="black", alpha=0.06)
    ax.set_yticks(range(len(raws)), [LABELS[s] for s in raws])
    ax.set_xlim(0, window_s)
    ax.set_xlabel("seconds from each system's first step (solid: node lost; dotted: node back; shaded: notice)")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()], labels=list(colors),
              ncol=4, loc="upper center", bbox_to_anchor=(0.5, 1.35), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def step_period(steps: list[dict]) -> float:
    """Seconds per step as a user sees them: the median time between consecutive step ends (the work between
    steps included), after the first two."""
    ends = sorted(x["end"] for x in steps)[2:]
    gaps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return statistics.median(gaps) if gaps else float("nan")


def report(steady: dict, trace_runs: dict, trace: list[TraceEvent], window_s: float) -> None:
    from rich.console import Console
    from rich.table import Table

    figs = {s: figures(r, trace, window_s) for s, r in trace_runs.items()}
    steady_step = {s: step_period(r["steps"]) for s, r in steady.items()}
    table = Table(title=f"Goodput under one preemption trace ({window_s:.0f} s from each system's first step; "
                        f"25m model, batch {BATCH} x {SEQ}; 2 + 2 workers on a permanent and a spot node)")
    for col in ("system", "ETTR", "goodput samples/s", "ours / theirs", "steps done", "steps replayed",
                "s lost per event", "s to next step after each change", "loss at window end", "no-failure s/step",
                "vs ours"):
        table.add_column(col, justify="left" if col == "system" else "right")
    ours = figs.get("elastic")
    for system, f in figs.items():
        ratio = f"{ours['goodput'] / f['goodput']:.2f}" if ours and f["goodput"] > 0 else "-"
        backs = " ".join("-" if b is None else f"{b:.1f}" for b in f["back"])
        step_ratio = steady_step[system] / steady_step["elastic"] if "elastic" in steady_step else float("nan")
        lost = (f["replaying_s"] + f["stalled_s"] + f["restarting_s"]) / max(len(trace), 1)
        table.add_row(LABELS[system], f"{f['ettr']:.3f}", f"{f['goodput']:.2f}", ratio, str(f["steps"]),
                      str(f["replayed"]), f"{lost:.1f}", backs, f"{f['final_loss']:.3f}",
                      f"{steady_step[system]:.2f}", f"{step_ratio:.2f}")
    Console(width=200).print(table)
    for system, f in figs.items():
        spent = ", ".join(f"{k} {f[f'{k}_s']:.0f} s" for k in ("productive", "replaying", "stalled", "restarting"))
        print(f"{LABELS[system]}: {spent}")
    print("ours / theirs: our goodput over the system's, in this run. s lost per event: the window's time not "
          "spent on a first-time step (replaying, stalled, restarting; the gaps between ordinary steps included), "
          "over the trace's events: the cost of one event at any rate, where ETTR depends on the trace's "
          "compression. s to next step: per event, from the node gone (or added) to the end of the first step "
          "begun after it (a return: the first on more workers; '-': none in the window). no-failure s/step: the "
          "median time between consecutive step ends on 4 workers with no events (measured first); vs ours: the "
          "system's over ours.")
    if ours:
        print(f"targets: ETTR >= 0.95: {ours['ettr']:.3f}; goodput >= 2x Ray Train: "
              f"{ours['goodput'] / max(figs.get('raytrain', {}).get('goodput', 0), 1e-9):.2f}x; >= 1.5x torchrun: "
              f"{ours['goodput'] / max(figs.get('torchrun', {}).get('goodput', 0), 1e-9):.2f}x; no-failure step <= "
              f"1.03x torchrun's: {steady_step['elastic'] / steady_step.get('torchrun', float('nan')):.2f}x")


def trace_label(args) -> str:
    if args.quick:
        return f"--quick: one of each, evenly spaced over {args.window or 180:.0f} s"
    return f"seed {args.seed}, an event every {args.mean_gap:.0f} s on average"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=float, default=None, help="seconds per system (600; --quick: 180)")
    parser.add_argument("--mean-gap", type=float, default=60.0, help="mean seconds between trace events")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--steady-s", type=float, default=45.0, help="the no-failure run's window per system")
    parser.add_argument("--report-only", action="store_true", help="print the table and plot of the last run "
                        "again from bench/out/goodput_raw.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        spec = json.loads(args.one)
        trace = [TraceEvent(**e) for e in spec["trace"]]
        print("RESULT " + json.dumps(run_one(spec["system"], trace, spec["window"])), flush=True)
        return
    window = args.window or (180.0 if args.quick else 600.0)
    trace = make_trace(args.seed, window, args.mean_gap, quick=args.quick)
    out = ROOT / "bench/out"
    if args.report_only:
        raw = json.loads((out / "goodput_raw.json").read_text())
        steady, runs = raw["steady"], raw["runs"]
        trace, window = [TraceEvent(**e) for e in raw["trace"]], raw["window"]
    print(f"trace ({raw.get('label', '') if args.report_only else trace_label(args)}):\n{describe(trace)}",
          flush=True)
    if not args.report_only:
        systems = args.systems.split(",")
        steady = {s: in_subprocess(s, [], args.steady_s) for s in systems}
        runs = {}
        for system in systems:
            runs[system] = in_subprocess(system, trace, window)
            print(f"  {system}: {len(runs[system]['steps'])} steps logged", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "goodput_raw.json").write_text(json.dumps({"steady": steady, "runs": runs, "window": window,
                                                          "trace": [e.__dict__ for e in trace],
                                                          "label": trace_label(args)}))
    plot(runs, trace, window, out / "goodput.png")
    report(steady, runs, trace, window)
    print(f"timeline plot: {out / 'goodput.png'}")


if __name__ == "__main__":
    main()
