"""LoRA against full fine-tuning on a ~100M-parameter base, 4 workers, in one run.

Every run starts from the same base folder (the seed's weights saved as a Hugging Face folder, as a user's
``--base``). Prints, for full fine-tuning, LoRA (r=16 on every attention and MLP projection) taking its
frozen base from peers, and LoRA reading it from the base folder (memory-mapped safetensors):
- per-worker peak memory (RSS) and step time;
- the live reshard fsdp=4 -> dp=2,tp=2 three ways: rebuilding the engines on the stall, back onto the
  skeleton parked when the job left fsdp=4, and with the target's skeleton built ahead while training.
  A LoRA job's optimizer state is tiny and its frozen base moves without moments (or not at all, from disk).

Usage: python bench/lora.py [--model 100m] [--batch 8] [--seq 64] [--steps 3]
Never fails on timing.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch
from probes import drop_skeletons, memory
from rich.console import Console
from rich.table import Table

from elastic.core.config import MODEL_PRESETS, Config, DataConfig, LoraConfig, OptimConfig, RuntimeConfig, TrainConfig
from elastic.core.layout import Layout, Placement
from elastic.driver.ray_group import RayWorkerGroup
from elastic.driver.resharder import frozen_from_disk, plan_move, reshard
from elastic.model.hf import save_hf_model
from elastic.model.init import init_box
from elastic.model.specs import param_specs


def make_config(args, lora: bool, base: str, base_from: str = "peer") -> Config:
    return Config(model=MODEL_PRESETS[args.model], lora=LoraConfig(r=16, alpha=32.0) if lora else None,
                  data=DataConfig(dataset="stdlib", seq_len=args.seq, max_corpus_bytes=1_000_000),
                  train=TrainConfig(steps=1000, global_batch=args.batch, dtype="float32", init_from=base),
                  optim=OptimConfig(lr=1e-4, warmup_steps=0),
                  runtime=RuntimeConfig(workers=4, cpus_per_worker=0.5, collective_timeout_s=300, store_timeout_s=120,
                                        base_from=base_from))


def write_base(args, folder: Path) -> str:
    """The base model as a Hugging Face folder (the seed's weights), which every run starts from."""
    model = MODEL_PRESETS[args.model]
    cfg = Config(model=model)
    state = {s.name: init_box(s, tuple((0, n) for n in s.shape), model, cfg.train.seed, torch.float32)
             for s in param_specs(cfg)}
    return str(save_hf_model(folder, model, state))


def measure(cfg: Config, steps: int) -> dict:
    """One config on 4 fresh workers, so that neither run inherits the other's heap."""
    group = RayWorkerGroup(cfg)
    try:
        return _measure(group, cfg, steps)
    finally:
        group.shutdown()


def _measure(group: RayWorkerGroup, cfg: Config, steps: int) -> dict:
    workers = tuple(group.spawn(4))
    group.setup(Placement(Layout(fsdp=4), workers))
    group.step()  # warm up
    memory(group, workers, reset_peak=True)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        group.step()
        times.append(time.perf_counter() - started)
    peak = max(m["peak"] for m in memory(group, workers).values())
    a, b = Placement(Layout(fsdp=4), workers), Placement(Layout(dp=2, tp=2), workers)
    drop_skeletons(group, workers)  # the first move builds on the stall, as every reshard did before skeletons
    disk = frozen_from_disk(cfg)  # the frozen base's tensors when the config reads them from disk, else none
    there = reshard(group, plan_move(group, b), group.committed, "bench", disk)
    group.step()
    back = reshard(group, plan_move(group, a), group.committed, "bench", disk)  # binds the skeleton parked on a
    group.step()
    drop_skeletons(group, workers)
    group.prepare([b])  # built in the background while the job trains
    while not group.build_done(b):
        group.step()
    ahead = reshard(group, plan_move(group, b), group.committed, "bench", disk)
    trainable = sum(s.numel for s in param_specs(cfg) if s.trainable)
    return {"step": statistics.median(times), "peak": peak, "reshard": [there, back, ahead], "trainable": trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="100m", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    console = Console(width=170)
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    folder = Path(tempfile.mkdtemp(prefix="elastic-bench-base-"))
    try:
        base = write_base(args, folder)
        full = measure(make_config(args, lora=False, base=base), args.steps)
        lora = measure(make_config(args, lora=True, base=base), args.steps)
        disk = measure(make_config(args, lora=True, base=base, base_from="disk"), args.steps)
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
    n = MODEL_PRESETS[args.model].num_params()
    table = Table(title=f"LoRA r=16 vs full fine-tuning ({args.model}: {n / 1e6:.0f}M parameters, fsdp=4, "
                        f"batch {args.batch} x {args.seq})")
    for col in ("run", "trainable params", "step s", "peak RSS / worker MB", "fsdp=4 -> dp=2,tp=2 (rebuild)",
                "of which transfer / commit", "and back (parked skeleton)", "there, built ahead",
                "of which transfer / commit", "MB moved (there)"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, r in (("full fine-tuning", full), ("LoRA r=16, base from peers", lora),
                    ("LoRA r=16, base from disk", disk)):
        there, back, ahead = r["reshard"]
        table.add_row(name, f"{r['trainable'] / 1e6:.2f}M", f"{r['step']:.2f}", f"{r['peak'] / 1e6:,.0f}",
                      f"{there.total_seconds:.2f} s", f"{there.transfer_seconds:.2f} / {there.commit_seconds:.2f} s",
                      f"{back.total_seconds:.2f} s", f"{ahead.total_seconds:.2f} s",
                      f"{ahead.transfer_seconds:.2f} / {ahead.commit_seconds:.2f} s", f"{there.bytes_moved / 1e6:,.0f}")
    console.print(table)
    ratio = {key: lora_value / full_value for key, lora_value, full_value in (
        ("step", lora["step"], full["step"]), ("peak", lora["peak"], full["peak"]),
        ("reshard", lora["reshard"][0].total_seconds, full["reshard"][0].total_seconds),
        ("ahead", lora["reshard"][2].total_seconds, full["reshard"][2].total_seconds),
        ("disk", disk["reshard"][2].total_seconds, full["reshard"][2].total_seconds),
        ("bytes", lora["reshard"][0].bytes_moved, max(full["reshard"][0].bytes_moved, 1)))}
    console.print(f"LoRA / full: step time x{ratio['step']:.2f}, peak memory x{ratio['peak']:.2f}, "
                  f"reshard time x{ratio['reshard']:.2f} rebuilding on the stall, x{ratio['ahead']:.2f} built ahead "
                  f"(target <= 0.4: {'met' if ratio['ahead'] <= 0.4 else 'NOT met'}), x{ratio['disk']:.2f} built "
                  f"ahead with the base read from disk ({'met' if ratio['disk'] <= 0.4 else 'NOT met'}), "
                  f"bytes moved x{ratio['bytes']:.2f}")
    read = disk["reshard"][2]
    seconds = max((w.get("disk_seconds", 0.0) for w in read.workers.values()), default=0.0)
    console.print(f"base from disk: {read.bytes_read / 1e6:,.0f} MB read from the base folder "
                  f"(slowest worker {seconds:.2f} s) instead of received; {read.bytes_moved / 1e6:,.0f} MB still moved")
    console.print("rebuild: the commit forms the new groups and builds the engine (FSDP/DTensor set-up is per "
                  "parameter, and LoRA adds two small parameters per adapted projection). built ahead: the "
                  "skeleton was built while training went on; the commit binds it. The base still moves from "
                  "peers (no read from the base folder).")


if __name__ == "__main__":
    main()
