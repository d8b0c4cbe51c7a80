"""LoRA against full fine-tuning on a ~100M-parameter base, 4 workers, in one run.

Prints, for LoRA (r=16 on every attention and MLP projection) and for full fine-tuning of the
same model, layout and batch:
- per-worker peak memory (RSS) and step time;
- the live reshard time for the same transition (fsdp=4 -> dp=2,tp=2 and back): a LoRA job's
  optimizer state is tiny and its frozen base moves without moments, so it moves far fewer bytes.

Usage: python bench/lora.py [--model 100m] [--batch 8] [--seq 64] [--steps 3]
Never fails on timing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray
from rich.console import Console
from rich.table import Table

from elastic.core.config import MODEL_PRESETS, Config, DataConfig, LoraConfig, OptimConfig, RuntimeConfig, TrainConfig
from elastic.core.layout import Layout, Placement
from elastic.driver.ray_group import RayWorkerGroup
from elastic.driver.resharder import plan_move, reshard
from elastic.model.specs import param_specs


def make_config(args, lora: bool) -> Config:
    return Config(model=MODEL_PRESETS[args.model], lora=LoraConfig(r=16, alpha=32.0) if lora else None,
                  data=DataConfig(dataset="stdlib", seq_len=args.seq, max_corpus_bytes=1_000_000),
                  train=TrainConfig(steps=1000, global_batch=args.batch, dtype="float32"),
                  optim=OptimConfig(lr=1e-4, warmup_steps=0),
                  runtime=RuntimeConfig(workers=4, cpus_per_worker=0.5, collective_timeout_s=300, store_timeout_s=120))


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
    group.memory(workers, reset_peak=True)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        group.step()
        times.append(time.perf_counter() - started)
    peak = max(m["peak"] for m in group.memory(workers).values())
    there = reshard(group, plan_move(group, Placement(Layout(dp=2, tp=2), workers)), group.committed, "bench")
    group.step()
    back = reshard(group, plan_move(group, Placement(Layout(fsdp=4), workers)), group.committed, "bench")
    trainable = sum(s.numel for s in param_specs(cfg) if s.trainable)
    return {"step": statistics.median(times), "peak": peak, "reshard": [there, back], "trainable": trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="100m", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    console = Console(width=170)
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        full = measure(make_config(args, lora=False), args.steps)
        lora = measure(make_config(args, lora=True), args.steps)
    finally:
        ray.shutdown()
    n = MODEL_PRESETS[args.model].num_params()
    table = Table(title=f"LoRA r=16 vs full fine-tuning ({args.model}: {n / 1e6:.0f}M parameters, fsdp=4, "
                        f"batch {args.batch} x {args.seq})")
    for col in ("run", "trainable params", "step s", "peak RSS / worker MB", "reshard fsdp=4 -> dp=2,tp=2",
                "and back", "of which transfer / rebuild", "MB moved (there)"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, r in (("full fine-tuning", full), ("LoRA r=16", lora)):
        there, back = r["reshard"]
        table.add_row(name, f"{r['trainable'] / 1e6:.2f}M", f"{r['step']:.2f}", f"{r['peak'] / 1e6:,.0f}",
                      f"{there.total_seconds:.2f} s", f"{back.total_seconds:.2f} s",
                      f"{there.transfer_seconds:.2f} / {there.commit_seconds:.2f} s", f"{there.bytes_moved / 1e6:,.0f}")
    console.print(table)
    ratio = {key: lora_value / full_value for key, lora_value, full_value in (
        ("step", lora["step"], full["step"]), ("peak", lora["peak"], full["peak"]),
        ("reshard", lora["reshard"][0].total_seconds, full["reshard"][0].total_seconds),
        ("bytes", lora["reshard"][0].bytes_moved, max(full["reshard"][0].bytes_moved, 1)))}
    console.print(f"LoRA / full: step time x{ratio['step']:.2f}, peak memory x{ratio['peak']:.2f}, "
                  f"reshard time x{ratio['reshard']:.2f}, bytes moved x{ratio['bytes']:.2f}")
    console.print("rebuild: forming the new groups and building the engine (FSDP/DTensor set-up is per "
                  "parameter, and LoRA adds two small parameters per adapted projection)")


if __name__ == "__main__":
    main()
