"""Recovery: mean time to recovery (MTTR) of a killed worker, live versus checkpoint-restart.

For a ~25M and a ~100M-parameter model on 4 workers (float32, AdamW), one run each prints:
- MTTR with a replica (layout dp=2,fsdp=2): from the SIGKILL until the step that was killed has
  completed after the job recovered onto the 3 survivors, shards taken from the surviving replica;
- MTTR with no replica (fsdp=4) and an in-memory snapshot every 4 steps: restore and replay;
- steps lost (replayed) in each case;
- the checkpoint-restart baseline in the same run, as torchrun and Ray Train restart: on the failure,
  SIGKILL every worker, start new processes (imports only, no warm-up), build empty engines, load the
  newest DCP checkpoint (written every 4 steps, no checksums) and redo the lost steps.

Usage: python bench/recovery.py [--models 25m,100m] [--batch 4] [--seq 64]
Never fails on timing.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import ray
from rich.console import Console
from rich.table import Table

from elastic.control.controller import Controller
from elastic.control.events import Stop
from elastic.control.run import with_control
from elastic.control.states import Running
from elastic.core.config import MODEL_PRESETS, Config, DataConfig, OptimConfig, RuntimeConfig, TrainConfig
from elastic.core.layout import Layout, Placement
from elastic.driver.connect import connect_ray
from elastic.driver.group import WorkerFailure
from elastic.driver.ray_group import RayWorkerGroup
from elastic.runtime.dcp import DcpLoad, DcpSave
from elastic.tools.progress import configure_logging

KILL_AT = 6  # the kill lands during this step; snapshots and checkpoints every 4 steps (last at 4)


def make_config(model: str, batch: int, seq: int) -> Config:
    return Config(model=MODEL_PRESETS[model],
                  data=DataConfig(dataset="stdlib", seq_len=seq, max_corpus_bytes=1_000_000),
                  train=TrainConfig(steps=100_000, global_batch=batch, dtype="float32"),
                  optim=OptimConfig(lr=1e-4, warmup_steps=0),
                  # The memory limit keeps the policy off full replicas of the 100m state on 3 workers after a
                  # loss, which (with the staged copies of the reshard back to 4) would not fit in 24 GB.
                  runtime=RuntimeConfig(workers=4, cpus_per_worker=0.5, collective_timeout_s=300, store_timeout_s=120,
                                        memory_per_worker_gb=2.5))


def live(cfg: Config, layout: Layout, snapshot_every: int) -> dict:
    """Run under the controller, SIGKILL one worker mid-step, time until a step completes after recovery."""
    controller = Controller(with_control(cfg, layout=layout, objective="use_all", snapshot_every=snapshot_every),
                            progress=False, gather_tensors=False)
    killed = {}

    def chaos():
        while controller.step < KILL_AT or not isinstance(controller.state, Running):
            time.sleep(0.002)
        time.sleep(0.2)  # inside the step
        victim = controller.group.placement.workers[-1]
        killed["at"], killed["step"] = time.perf_counter(), controller.step
        controller.group.kill(victim)
        while not any(h.step == KILL_AT for h in controller.history):  # the killed step, redone
            time.sleep(0.01)
        controller.submit(Stop(reason="benchmark done"))

    thread = threading.Thread(target=chaos, daemon=True)
    try:
        controller.start()
        thread.start()
        result = controller.run_started()
    finally:
        controller.shutdown()
    recovered = next(e for e in result.events if e["kind"] == "recovered")
    recovered_at = controller.journal.started + recovered["time"]
    first = min((h for h in result.history if h.ended > recovered_at), key=lambda h: h.ended)
    redone = next(h for h in result.history if h.step == KILL_AT)
    steady = statistics.median(h.seconds for h in result.history if h.ended < killed["at"] and h.step > 0)
    moves = [r for r in result.reshards if r.reason.startswith("recover")]
    commits = [w["commit"] for r in moves for w in r.workers.values() if "commit" in w]
    # The killed step is redone whole (every rank's micro-batches), and so is every replayed step.
    per_step = layout.data_parallel * layout.microbatches
    return {"mttr": redone.ended - killed["at"], "back": first.ended - first.seconds - killed["at"],
            "recover": recovered["seconds"], "lost": recovered["steps_lost"], "how": recovered["how"],
            "steady": steady, "redone": (recovered["steps_lost"] + 1) * per_step,
            "skeleton": "yes" if commits and all(c.get("bound") for c in commits) else "no" if commits else "-"}


def checkpoint_restart(cfg: Config, layout: Layout) -> dict:
    """What torchrun / Ray Train do: on a failure, SIGKILL every worker, start new processes (no warm-up), build
    empty engines and load the newest DCP checkpoint (written every 4 steps, no checksums), then redo the steps."""
    root = Path(tempfile.mkdtemp(prefix="elastic-bench-recovery-"))
    group = RayWorkerGroup(cfg)
    try:
        group.setup(Placement(layout, tuple(group.spawn(layout.world, warm=False))))
        saved = 0
        for step in range(KILL_AT + 1):
            if step and step % 4 == 0:
                group.run({w: DcpSave(str(root / f"step_{step}")) for w in group.placement.workers})
                saved = step
            if step == KILL_AT:
                threading.Timer(0.2, group.kill, args=(group.placement.workers[-1],)).start()
                killed = time.perf_counter() + 0.2
            try:
                group.step()
            except WorkerFailure:
                break
        for w in group.warm():
            group.kill(w)
        group.remove(list(group.live()))
        fresh = group.spawn(layout.world, warm=False)
        group.setup(Placement(layout, tuple(fresh)), step=saved, empty=True)
        resumed = min(group.run({w: DcpLoad(str(root / f"step_{saved}")) for w in fresh}).values())
        back = time.perf_counter() - killed
        lost = KILL_AT - resumed
        for _ in range(lost + 1):  # redo the lost steps, then the one that failed
            group.step()
        return {"mttr": time.perf_counter() - killed, "back": back, "lost": lost}
    finally:
        group.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="25m,100m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    console = Console(width=160)
    configure_logging()
    connect_ray(num_cpus=4)
    table = Table(title="MTTR after a SIGKILL (4 workers; kill -> the killed step completed after recovery)")
    for col in ("model", "case", "layout", "MTTR s", "x faster", "training again after s", "x faster ",
                "of which recovery s", "fallback skeleton", "steps lost", "micro-batches redone", "steady step s"):
        table.add_column(col, justify="left" if col in ("model", "case", "layout") else "right")
    for model in args.models.split(","):
        cfg = make_config(model, args.batch, args.seq)
        cold = with_control(cfg, prepare_ahead=False)
        replica = live(cfg, Layout(dp=2, fsdp=2), snapshot_every=4)
        rebuilt = live(cold, Layout(dp=2, fsdp=2), snapshot_every=4)
        snapshot = live(cfg, Layout(fsdp=4), snapshot_every=4)
        base = checkpoint_restart(cfg, Layout(fsdp=4))
        for case, r, layout in (("replica", replica, "dp=2,fsdp=2"),
                                ("replica, no skeleton ahead", rebuilt, "dp=2,fsdp=2"),
                                ("snapshot + replay", snapshot, "fsdp=4")):
            table.add_row(model, case, layout, f"{r['mttr']:.2f}", f"{base['mttr'] / r['mttr']:.1f}",
                          f"{r['back']:.2f}", f"{base['back'] / r['back']:.1f}", f"{r['recover']:.2f}",
                          r["skeleton"], str(r["lost"]), str(r["redone"]), f"{r['steady']:.2f}")
        table.add_row(model, "checkpoint-restart", "fsdp=4", f"{base['mttr']:.2f}", "1.0", f"{base['back']:.2f}",
                      "1.0", "-", "-", str(base["lost"]), str((base["lost"] + 1) * 4), "-")
    console.print(table)
    console.print(f"kill during step {KILL_AT}; in-memory snapshots and disk checkpoints every 4 steps.\n"
                  "MTTR: SIGKILL -> the killed step completed after recovery (lost steps replayed first). "
                  "Training again after: SIGKILL -> that first step (or the replay) starting, i.e. MTTR without "
                  "the steps themselves.\n"
                  "steady step: median step before the kill. A replacement worker starts in the background "
                  "meanwhile (importing torch competes for the 2 cores).\n"
                  "fallback skeleton: the recovery bound the skeleton built ahead for losing that worker (no skeleton "
                  "ahead: control.prepare_ahead off, the engines are built on the stall, as before). micro-batches "
                  "redone: the killed step is redone whole, plus every replayed step (the survivors' gradients "
                  "of the killed step are not kept).")
    ray.shutdown()


if __name__ == "__main__":
    main()
