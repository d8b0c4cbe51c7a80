"""Live reshard against checkpoint-restart, on a ~100M-parameter model with AdamW (4 workers).

For each transition it prints, from one run:
- reshard wall time, from the decision to every engine being ready on the new layout
  (the stall), and to the first step on the new layout having finished;
- bytes moved between processes, and the byte floor: those bytes over the point-to-point
  bandwidth measured in this same run (one gloo send/recv between two workers);
- peak extra memory per worker during the reshard (peak RSS minus RSS before);
- a checkpoint-restart baseline measured in the same run: save the full state to disk, stop
  the actors, start new ones, load, and run the first step (what torchrun and Ray Train do).

Usage: python bench/reshard.py [--model 100m] [--batch 4] [--seq 64]     (about 3-4 minutes)
       python bench/reshard.py --model 25m                               (quicker)
Never fails on timing.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import ray
from rich.console import Console
from rich.table import Table

from elastic.core.config import MODEL_PRESETS, Config, DataConfig, OptimConfig, RuntimeConfig, TrainConfig
from elastic.core.layout import Layout, Placement
from elastic.driver.checkpoints import resume_checkpoint, save_checkpoint
from elastic.driver.ray_group import RayWorkerGroup
from elastic.driver.resharder import plan_move, reshard


def make_config(args) -> Config:
    return Config(model=MODEL_PRESETS[args.model],
                  data=DataConfig(dataset="stdlib", seq_len=args.seq, max_corpus_bytes=1_000_000),
                  train=TrainConfig(steps=1000, global_batch=args.batch, dtype="float32"),
                  optim=OptimConfig(lr=1e-4, warmup_steps=0),
                  runtime=RuntimeConfig(workers=4, cpus_per_worker=0.5, collective_timeout_s=300,
                                        store_timeout_s=120))


def measure(group: RayWorkerGroup, target: Placement, reason: str) -> dict:
    """One live reshard plus the first step after it, with memory and byte figures."""
    involved = sorted(set(group.placement.workers) | set(target.workers))
    before = group.memory(involved, reset_peak=True)
    started = time.perf_counter()
    report = reshard(group, plan_move(group, target), group.committed, reason)
    ready = time.perf_counter() - started
    after = group.memory(involved)
    group.step()
    first = time.perf_counter() - started
    extra = max(after[w]["peak"] - before[w]["rss"] for w in involved)
    commits = [w["commit"] for w in report.workers.values() if "commit" in w]
    return {"old": report.old, "new": report.new, "reason": reason, "ready": ready, "first_step": first,
            "bytes": report.bytes_moved, "peak_extra": extra, "transfer": report.transfer_seconds,
            "commit": report.commit_seconds, "plan": report.plan_seconds,
            "execute": max(w["seconds"] for w in report.workers.values()),
            "leave": max(c["leave"] for c in commits), "group": max(c["group"] for c in commits),
            "engine": max(c["engine"] for c in commits)}


def checkpoint_restart(group: RayWorkerGroup, target_layout: Layout) -> dict:
    """Save to disk, stop every actor, start new ones, load, run the first step."""
    folder = Path(tempfile.mkdtemp(prefix="elastic-bench-ckpt-"))
    try:
        started = time.perf_counter()
        saved, _ = save_checkpoint(group, folder)
        save_s = time.perf_counter() - started
        group.shutdown()
        fresh = group.spawn(target_layout.world)
        spawned = time.perf_counter() - started
        resume_checkpoint(group, saved, Placement(target_layout, tuple(fresh)))
        loaded = time.perf_counter() - started
        group.step()
        total = time.perf_counter() - started
        size = sum(f.stat().st_size for f in saved.iterdir())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"save": save_s, "restart": spawned - save_s, "load": loaded - spawned, "first_step": total - loaded,
            "total": total, "stall": loaded, "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="100m", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    cfg = make_config(args)
    console = Console(width=170)
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    group = RayWorkerGroup(cfg)
    ids = group.spawn(5)  # the fifth is the spare that joins in the "add" transition, already warm
    a, b, c, d, spare = ids
    state_gb = cfg.model.num_params() * 4 * 3 / 1e9
    console.print(f"model {args.model}: {cfg.model.num_params() / 1e6:.0f}M parameters, float32 + AdamW "
                  f"= {state_gb:.2f} GB of training state; batch {args.batch} x {args.seq}")
    group.setup(Placement(Layout(dp=4), (a, b, c, d)))
    group.step()
    bandwidth = group.probe_bandwidth(a, b, 256 << 20)
    console.print(f"point-to-point bandwidth between two workers: {bandwidth / 1e9:.2f} GB/s")

    rows = [measure(group, Placement(Layout(dp=2, tp=2), (a, b, c, d)), "relayout"),
            measure(group, Placement(Layout(fsdp=4), (a, b, c, d)), "relayout")]
    rows.append(measure(group, Placement(Layout(fsdp=3), (a, b, c)), "drain 1 worker"))
    group.remove([d])  # the drained worker leaves (its process would hold its heap; 100m x dp=4 is tight in 24 GB)
    rows.append(measure(group, Placement(Layout(fsdp=4), (a, b, c, spare)), "add 1 worker"))
    reshard(group, plan_move(group, Placement(Layout(tp=2, pp=2, microbatches=2), (a, b, c, spare))),
            group.committed, "setup")
    group.step()
    rows.append(measure(group, Placement(Layout(dp=4), (a, b, c, spare)), "relayout"))
    base = checkpoint_restart(group, Layout(dp=2, tp=2))
    group.shutdown()

    table = Table(title=f"Live reshard vs checkpoint-restart ({args.model}, {state_gb:.2f} GB state, 4 workers)")
    for col in ("transition", "reason", "stall s", "to 1st step s", "MB moved", "byte floor s", "x floor",
                "peak extra MB", "x faster (stall)", "x faster (to 1st step)"):
        table.add_column(col, justify="left" if col in ("transition", "reason") else "right")
    for r in rows:
        floor = r["bytes"] / bandwidth
        versus = f"{r['transfer'] / floor:.1f}" if floor > 0.01 else "-"
        table.add_row(f"{r['old']} -> {r['new']}", r["reason"], f"{r['ready']:.2f}", f"{r['first_step']:.2f}",
                      f"{r['bytes'] / 1e6:,.0f}", f"{floor:.2f}", versus,
                      f"{r['peak_extra'] / 1e6:,.0f}", f"{base['stall'] / r['ready']:.0f}",
                      f"{base['total'] / r['first_step']:.0f}")
    console.print(table)
    parts = Table(title="Where the stall goes (slowest worker per phase, seconds)")
    for col in ("transition", "plan", "transfer phase", "of which p2p", "commit phase", "leave group", "form group",
                "build engine"):
        parts.add_column(col, justify="left" if col == "transition" else "right")
    for r in rows:
        parts.add_row(f"{r['old']} -> {r['new']}", f"{r['plan']:.3f}", f"{r['transfer']:.3f}", f"{r['execute']:.3f}",
                      f"{r['commit']:.3f}", f"{r['leave']:.3f}", f"{r['group']:.3f}", f"{r['engine']:.3f}")
    console.print(parts)
    console.print(f"checkpoint-restart baseline (dp=4 -> dp=2,tp=2): save {base['save']:.2f} s "
                  f"({base['bytes'] / 1e9:.2f} GB), restart actors {base['restart']:.2f} s, load {base['load']:.2f} s, "
                  f"first step {base['first_step']:.2f} s: total {base['total']:.2f} s")
    console.print("stall: decision to every engine ready; x floor: transfer phase / byte floor; "
                  "x faster (stall): baseline save+restart+load / live stall; "
                  "x faster (to 1st step): both including their first step")
    ray.shutdown()


if __name__ == "__main__":
    main()
