"""Throughput: our engine against a plain hand-written torch loop, and 2-worker layouts.

For a ~25M-parameter model (float32) it prints tokens/s of
- a plain single-process torch loop (the baseline: model, AdamW, clip, nothing else);
- our Engine at layout 1 in the same process, interleaved with the baseline so both see the
  same machine noise (the ratio is the figure that matters; target >= 0.95);
- dp2, tp2, fsdp2 and pp2 on 2 Ray workers (1 thread each, 2 cores in all).

Usage: python bench/throughput.py [--steps 6] [--model 25m] [--batch 8] [--seq 128]
Never fails on timing; it prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from elastic.core.config import MODEL_PRESETS, Config, DataConfig, OptimConfig, RuntimeConfig, TrainConfig
from elastic.core.data import GlobalSampler, build_dataset
from elastic.core.layout import Layout, Placement
from elastic.model.init import init_tensor
from elastic.model.llama import LlamaStage, causal_lm_loss_sum, tensor_specs
from elastic.runtime.engine import Engine


def make_config(args) -> Config:
    model = MODEL_PRESETS[args.model]
    return Config(model=model,
                  data=DataConfig(dataset="stdlib", seq_len=args.seq, max_corpus_bytes=2_000_000),
                  train=TrainConfig(steps=1000, global_batch=args.batch, dtype="float32"),
                  optim=OptimConfig(lr=1e-3, warmup_steps=0),
                  runtime=RuntimeConfig(workers=2, cpus_per_worker=0.5, threads_per_worker=1))


class PlainLoop:
    """The baseline: what someone would write by hand in one process."""

    def __init__(self, cfg: Config) -> None:
        self.model = LlamaStage(cfg.model)
        with torch.no_grad():
            for spec, (_, p) in zip(tensor_specs(cfg.model), self.model.named_parameters(), strict=True):
                p.copy_(init_tensor(spec, cfg.model, cfg.train.seed, torch.float32))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr, betas=(0.9, 0.95),
                                     weight_decay=0.01)
        self.data = build_dataset(cfg.data, cfg.train.seed)
        self.sampler = GlobalSampler(len(self.data), cfg.train.global_batch, cfg.train.seed)
        self.step_no = 0

    def step(self) -> None:
        x, y = self.data.batch(self.sampler.step_indices(self.step_no))
        loss = causal_lm_loss_sum(self.model(x), y) / int((y != -100).sum())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1


def timed(fn, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - started) / steps


def in_process(cfg: Config, steps: int, rounds: int) -> tuple[float, float]:
    torch.set_num_threads(2)
    plain = PlainLoop(cfg)
    engine = Engine(cfg, Placement(Layout(), (0,)), 0)
    plain.step(), engine.train_step()  # warm up both
    base, ours = [], []
    for _ in range(rounds):  # interleave so both see the same noise
        base.append(timed(plain.step, steps))
        ours.append(timed(engine.train_step, steps))
    return statistics.median(base), statistics.median(ours)


def on_workers(cfg: Config, layouts: list[str], steps: int) -> dict[str, float]:
    import ray

    from elastic.driver.ray_group import RayWorkerGroup

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    group = RayWorkerGroup(cfg)
    workers = group.spawn(2)
    out = {}
    try:
        for text in layouts:
            layout = Layout.parse(text)
            placement = Placement(layout, tuple(workers))
            group.setup(placement)
            group.step()  # warm up
            out[text] = timed(group.step, steps)
    finally:
        group.shutdown()
        ray.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="25m", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds for the in-process pair")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    cfg = make_config(args)
    tokens = args.batch * args.seq
    console = Console(width=120)
    console.print(f"model {args.model}: {cfg.model.num_params() / 1e6:.1f}M parameters, float32, "
                  f"batch {args.batch} x {args.seq} tokens")
    base, ours = in_process(cfg, args.steps, args.rounds)
    multi = on_workers(cfg, ["dp=2", "tp=2", "fsdp=2", "pp=2,mb=2"], args.steps)
    table = Table(title="Training throughput (tokens/s; ratio against the plain loop in this run)")
    for col in ("run", "processes", "tokens/s", "s/step", "ratio"):
        table.add_column(col, justify="right" if col != "run" else "left")
    table.add_row("plain torch loop (baseline)", "1", f"{tokens / base:,.0f}", f"{base:.3f}", "1.00")
    table.add_row("engine, layout 1", "1", f"{tokens / ours:,.0f}", f"{ours:.3f}", f"{base / ours:.2f}")
    for text, sec in multi.items():
        table.add_row(f"engine, {text}", "2", f"{tokens / sec:,.0f}", f"{sec:.3f}", f"{base / sec:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
