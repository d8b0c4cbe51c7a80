"""Live reshard against a fair checkpoint-restart, on a ~100M-parameter model with AdamW (4 workers).

For each transition it prints, from one run:
- the live stall (decision to every engine ready on the new layout) and the time to the first step on it;
- bytes moved between processes, and two floors measured in this same run:
  - p2p: the busiest worker's bytes in or out over the bandwidth of its link when every (sender,
    receiver) pair of this transition sends at once (gloo over loopback, concurrency included);
  - memcpy: the busiest worker's local copies over the copy rate when all workers copy at once;
  the stall is shown as a multiple of the larger floor;
- peak extra memory per worker during the reshard (peak RSS minus RSS before);
- the checkpoint-restart baseline for that same transition, the way users restart today: DCP saves the
  sharded state (torch.distributed.checkpoint, no checksums), every worker process is SIGKILLed, new ones
  start at the transition's own world size (processes and imports only, no warm-up), the new layout's
  engines are built empty, DCP loads (resharding), then the first step.

Between rows the job is moved (unmeasured) to the row's starting layout, so that each baseline starts from
the same state as its live reshard. Usage:

    python bench/reshard.py [--model 100m] [--batch 4] [--seq 64]     (about 8 minutes)
    python bench/reshard.py --model 25m                               (quicker)

Never fails on timing.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from probes import drop_skeletons, memcpy_rate, memory, probe_flows
from rich.console import Console
from rich.table import Table

from elastic.core.config import MODEL_PRESETS, Config, DataConfig, OptimConfig, RuntimeConfig, TrainConfig
from elastic.core.layout import Layout, Placement
from elastic.driver.connect import connect_ray
from elastic.driver.ray_group import RayWorkerGroup
from elastic.driver.resharder import plan_move, reshard
from elastic.runtime.dcp import DcpLoad, DcpSave
from elastic.tools.progress import configure_logging

# (from, to, reason, which workers the new layout uses: "same", "drain" the last one, "add" a spare)
TRANSITIONS = [("dp=4", "dp=2,tp=2", "relayout", "same"), ("dp=2,tp=2", "fsdp=4", "relayout", "same"),
               ("fsdp=4", "fsdp=3", "drain 1 worker", "drain"), ("fsdp=3", "fsdp=4", "add 1 worker", "add"),
               ("tp=2,pp=2,mb=2", "dp=4", "relayout", "same")]
PROBE_BYTES = 64 << 20


def make_config(args) -> Config:
    return Config(model=MODEL_PRESETS[args.model],
                  data=DataConfig(dataset="stdlib", seq_len=args.seq, max_corpus_bytes=1_000_000),
                  train=TrainConfig(steps=1000, global_batch=args.batch, dtype="float32"),
                  optim=OptimConfig(lr=1e-4, warmup_steps=0),
                  runtime=RuntimeConfig(workers=4, cpus_per_worker=0.5, collective_timeout_s=300,
                                        store_timeout_s=120))


def move_to(group: RayWorkerGroup, layout: Layout, spares: int = 0) -> Placement:
    """Put the job on ``layout`` (a live reshard, not measured), keeping ``spares`` warm idle workers."""
    need = layout.world + spares
    if len(group.warm()) < need:
        group.spawn(need - len(group.warm()))
    current = group.placement
    workers = [w for w in (current.workers if current else ()) if w in group.warm()]
    workers += [w for w in group.warm() if w not in workers]
    target = Placement(layout, tuple(workers[: layout.world]))
    if current is None:
        group.setup(target)
    elif target != current:
        reshard(group, plan_move(group, target), group.committed, "bench set-up")
    group.step()
    return target


def floors(group: RayWorkerGroup, target: Placement) -> dict:
    """The transition's p2p and memcpy floors, measured now on the workers involved."""
    plan = plan_move(group, target)
    src, dst, _ = plan.flows()
    pairs = list(zip(src.tolist(), dst.tolist(), strict=True))
    sent, received = plan.load_arrays()
    busiest = int(max(sent.max(initial=0), received.max(initial=0)))
    copied = int(plan.copied_array().max(initial=0))
    link = probe_flows(group, pairs, PROBE_BYTES) if pairs else float("inf")
    involved = sorted(set(group.placement.workers) | set(target.workers))
    memcpy = memcpy_rate(group, involved, PROBE_BYTES)
    return {"p2p": busiest / link, "memcpy": copied / memcpy, "link": link, "memcpy_rate": memcpy}


def step_seconds(group: RayWorkerGroup) -> float:
    started = time.perf_counter()
    group.step()
    return time.perf_counter() - started


def measure(group: RayWorkerGroup, target: Placement, reason: str, ahead: bool) -> dict:
    """One live reshard plus the first steps after it, with memory and byte figures.

    ``ahead``: the target's skeleton is built in the background first, while the job trains (the controller's
    way); else every skeleton is dropped first, so the commit forms the groups and builds the engines on the
    stall (the way every reshard went before skeletons)."""
    involved = sorted(set(group.placement.workers) | set(target.workers))
    drop_skeletons(group, group.warm())
    build = {"steps": 0, "seconds": 0.0, "step": 0.0, "rss": 0}
    if ahead:
        before = memory(group, involved)
        started = time.perf_counter()
        group.prepare([target])
        times = []
        while not group.build_done(target):
            times.append(step_seconds(group))
        build = {"steps": len(times), "seconds": time.perf_counter() - started,
                 "step": max(times, default=0.0), "rss": max(memory(group, involved)[w]["rss"] - before[w]["rss"]
                                                             for w in target.workers)}
    before = memory(group, involved, reset_peak=True)
    started = time.perf_counter()
    report = reshard(group, plan_move(group, target), group.committed, reason)
    ready = time.perf_counter() - started
    after = memory(group, involved)
    first = step_seconds(group)
    steady = sorted(step_seconds(group) for _ in range(3))[1]
    commits = [w["commit"] for w in report.workers.values() if "commit" in w]
    return {"old": report.old, "new": report.new, "reason": reason, "ready": ready, "first_step": ready + first,
            "first": first, "steady": steady, "build": build,
            "skeleton": all(c.get("bound") for c in commits),
            "bytes": report.bytes_moved, "peak_extra": max(after[w]["peak"] - before[w]["rss"] for w in involved),
            "transfer": report.transfer_seconds, "commit": report.commit_seconds, "plan": report.plan_seconds,
            "execute": max(w["seconds"] for w in report.workers.values()),
            "leave": max(c["leave"] for c in commits), "group": max(c["group"] for c in commits),
            "engine": max(c["engine"] for c in commits)}


def checkpoint_restart(group: RayWorkerGroup, layout: Layout) -> dict:
    """DCP save, SIGKILL every worker, start ``layout.world`` new processes, build empty engines, DCP load,
    first step. The group ends on ``layout`` with the new workers."""
    folder = Path(tempfile.mkdtemp(prefix="elastic-bench-dcp-"))
    try:
        step = group.committed
        started = time.perf_counter()
        group.run({w: DcpSave(str(folder)) for w in group.placement.workers})
        saved = time.perf_counter()
        for w in group.warm():
            group.kill(w)
        group.remove(list(group.live()))
        fresh = group.spawn(layout.world, warm=False)
        restarted = time.perf_counter()
        group.setup(Placement(layout, tuple(fresh)), step=step, empty=True)
        built = time.perf_counter()
        group.run({w: DcpLoad(str(folder)) for w in fresh})
        loaded = time.perf_counter()
        group.step()
        done = time.perf_counter()
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"save": saved - started, "restart": restarted - saved, "build": built - restarted,
            "load": loaded - built, "first_step": done - loaded, "stall": loaded - started, "total": done - started,
            "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="100m", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    configure_logging()
    cfg = make_config(args)
    console = Console(width=190)
    connect_ray(num_cpus=4)
    group = RayWorkerGroup(cfg)
    state_gb = cfg.model.num_params() * 4 * 3 / 1e9
    console.print(f"model {args.model}: {cfg.model.num_params() / 1e6:.0f}M parameters, float32 + AdamW "
                  f"= {state_gb:.2f} GB of training state; batch {args.batch} x {args.seq}")
    rows = []
    try:
        for old_text, new_text, reason, who in TRANSITIONS:
            old, new = Layout.parse(old_text), Layout.parse(new_text)
            current = move_to(group, old, spares=1 if who == "add" else 0)
            spare = [w for w in group.warm() if w not in current.workers]
            workers = {"same": current.workers, "drain": current.workers[:-1],
                       "add": current.workers + tuple(spare[:1])}[who]
            target = Placement(new, tuple(workers))
            bound = floors(group, target)
            live = measure(group, target, reason, ahead=False)
            move_to(group, old)  # the built-ahead reshard starts from the same layout
            fast = measure(group, target, reason, ahead=True)
            if who == "drain":
                group.remove([current.workers[-1]])  # the drained worker leaves (its heap would stay otherwise)
            move_to(group, old)  # the baseline starts from the same layout as the live reshard
            base = checkpoint_restart(group, new)
            rows.append({**live, **{f"floor_{k}": v for k, v in bound.items()}, "base": base, "ahead": fast})
            console.print(f"  {old} -> {new}: live {live['ready']:.2f} s (built ahead {fast['ready']:.2f} s), "
                          f"checkpoint-restart {base['stall']:.2f} s")
    finally:
        group.shutdown()

    table = Table(title=f"Live reshard vs checkpoint-restart ({args.model}, {state_gb:.2f} GB state, 4 workers)")
    for col in ("transition", "reason", "stall s", "to 1st step s", "MB moved", "p2p floor s", "memcpy floor s",
                "x floor", "peak extra MB", "ckpt-restart stall s", "x faster (stall)", "x faster (to 1st step)"):
        table.add_column(col, justify="left" if col in ("transition", "reason") else "right")
    for r in rows:
        floor = max(r["floor_p2p"], r["floor_memcpy"])
        table.add_row(f"{r['old']} -> {r['new']}", r["reason"], f"{r['ready']:.2f}", f"{r['first_step']:.2f}",
                      f"{r['bytes'] / 1e6:,.0f}", f"{r['floor_p2p']:.2f}", f"{r['floor_memcpy']:.2f}",
                      f"{r['ready'] / floor:.1f}" if floor > 0.01 else "-", f"{r['peak_extra'] / 1e6:,.0f}",
                      f"{r['base']['stall']:.2f}", f"{r['base']['stall'] / r['ready']:.1f}",
                      f"{r['base']['total'] / r['first_step']:.1f}")
    console.print(table)
    parts = Table(title="Where the live stall goes (slowest worker per phase, seconds)")
    for col in ("transition", "plan", "transfer phase", "of which p2p", "commit phase", "leave group", "form group",
                "build engine", "link GB/s", "memcpy GB/s"):
        parts.add_column(col, justify="left" if col == "transition" else "right")
    for r in rows:
        parts.add_row(f"{r['old']} -> {r['new']}", f"{r['plan']:.3f}", f"{r['transfer']:.3f}", f"{r['execute']:.3f}",
                      f"{r['commit']:.3f}", f"{r['leave']:.3f}", f"{r['group']:.3f}", f"{r['engine']:.3f}",
                      f"{r['floor_link'] / 1e9:.2f}", f"{r['floor_memcpy_rate'] / 1e9:.2f}")
    console.print(parts)
    base = Table(title="Where the checkpoint-restart stall goes (seconds; DCP, every process restarted)")
    for col in ("transition", "DCP save", "kill + start processes", "build engines", "DCP load", "stall",
                "first step", "GB on disk"):
        base.add_column(col, justify="left" if col == "transition" else "right")
    for r in rows:
        b = r["base"]
        base.add_row(f"{r['old']} -> {r['new']}", f"{b['save']:.2f}", f"{b['restart']:.2f}", f"{b['build']:.2f}",
                     f"{b['load']:.2f}", f"{b['stall']:.2f}", f"{b['first_step']:.2f}", f"{b['bytes'] / 1e9:.2f}")
    console.print(base)
    ahead = Table(title="Built ahead: the target's skeleton built while training goes on, then the reshard "
                        "(same run; 'rebuild' is the live reshard above, building on the stall)")
    for col in ("transition", "stall rebuild s", "stall ahead s", "ahead / rebuild", "engine in stall rebuild s",
                "engine in stall ahead s", "transfer ahead s", "floor s", "ahead / floor", "target 1.3 x floor + 0.1",
                "background build s", "steps during it", "slowest step then s", "first step s", "steady step s",
                "first / steady", "peak extra MB", "skeleton RSS MB"):
        ahead.add_column(col, justify="left" if col == "transition" else "right")
    for r in rows:
        a, floor = r["ahead"], max(r["floor_p2p"], r["floor_memcpy"])
        target = 1.3 * floor + 0.1
        ahead.add_row(f"{r['old']} -> {r['new']}", f"{r['ready']:.2f}", f"{a['ready']:.2f}",
                      f"{a['ready'] / r['ready']:.2f}", f"{r['engine']:.3f}",
                      f"{a['engine']:.3f}" + ("" if a["skeleton"] else " (rebuilt)"), f"{a['transfer']:.2f}",
                      f"{floor:.2f}", f"{a['ready'] / floor:.1f}" if floor > 0.01 else "-",
                      f"{target:.2f} ({'met' if a['ready'] <= target else 'NOT met'})",
                      f"{a['build']['seconds']:.2f}", f"{a['build']['steps']}", f"{a['build']['step']:.2f}",
                      f"{a['first']:.2f}", f"{a['steady']:.2f}", f"{a['first'] / a['steady']:.2f}",
                      f"{a['peak_extra'] / 1e6:,.0f}", f"{a['build']['rss'] / 1e6:,.0f}")
    console.print(ahead)
    console.print("floor: max(p2p floor, memcpy floor) of the first table. background build: from asking for the "
                  "skeleton to every worker having it, training meanwhile (steps during it, and the slowest of "
                  "them). first / steady: the first step on the new layout over the median of the next three. "
                  "skeleton RSS: the largest growth of a target worker's resident memory while its skeleton was "
                  "built (storage-free: metadata, groups and their buffers).")
    console.print("stall: decision to every engine ready (live) / DCP save to loaded on the new processes "
                  "(checkpoint-restart). x floor: live stall / max(p2p floor, memcpy floor). x faster: "
                  "checkpoint-restart / live, for the same transition, without and with each side's first step.")


if __name__ == "__main__":
    main()
