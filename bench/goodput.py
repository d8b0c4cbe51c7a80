"""Goodput under one preemption trace: this project, Ray Train v2 and torchrun, on the same capacity, in one run.

Every system trains the project's 25m model (global batch 8 x 64, AdamW at 1e-4, float32) on the same
capacity: a permanent node and a spot node with two workers each (0.5 CPU a worker; one machine of 2
cores), and lives through the same trace (``bench/goodput_trace.py``: preemptions with 30 s notice,
failures without one, capacity returning, with up and down times drawn from SkyPilot's measured AWS spot
trace and compressed 60x), at the same offsets from its own first step:

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
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import goodput_systems  # noqa: E402
from goodput_systems import BATCH, LABELS, SEQ, SYSTEMS  # noqa: E402
from goodput_trace import (  # noqa: E402
    SOURCE,
    Step,
    TraceEvent,
    account,
    back_after,
    describe,
    make_trace,
    timeline,
)

# ---- the table and the plot ---------------------------------------------------------------------------

def run_one(system: str, trace: list[TraceEvent], window_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"elastic-goodput-{system}-") as tmp:
        return getattr(goodput_systems, f"run_{system}")(Path(tmp), trace, window_s)


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
    return f"seed {args.seed}, {args.hour_s:g} s per hour of the measured trace ({SOURCE})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=float, default=None, help="seconds per system (600; --quick: 180)")
    parser.add_argument("--hour-s", type=float, default=60.0, help="seconds of the bench per hour of the measured "
                        "spot trace (bench/goodput_trace.py): 60 compresses it 60x")
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
    trace = make_trace(args.seed, window, args.hour_s, quick=args.quick)
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
