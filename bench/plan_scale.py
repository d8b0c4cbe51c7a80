"""Plan reconfigurations of 8B / 70B / 405B Llama-style jobs on 64 to 4,096 simulated workers.

No tensor is allocated and no process is started: tensor specs come from the model's shapes (one
decoder layer built on the meta device), and the planner (``elastic/reshard/plan.py``) is pure.
State: bf16 weights (2 bytes) plus fp32 AdamW moments (4 bytes each), i.e. 10 bytes per parameter.

Layouts (tp = 8 inside a node of 8 workers; global batch 4,096 sequences, checked by Layout.validate):
- train: tp=8, pp=P (8B: 1, 70B: 4, 405B: 8); the remaining nodes/P data ranks are HSDP, with
  sharding groups of up to F nodes (8B: 8, 70B: 32, 405B: 64) replicated dp times;
- scale-in / scale-out by one node (8 workers; a planned drain, so the leaving node can still send):
  tp=8, the pp dividing the new node count that is closest to P and valid for the batch, the fsdp
  group closest to the old one;
- dp -> tp x pp: from pure data parallelism (HSDP, fsdp groups of 64 workers, tp=1, pp=1) to train;
- train -> rollout: to tp=8, pp=1, dp = nodes (every node one inference replica); weights only,
  since rollout engines do not hold optimizer state.

Per (model, workers, transition): planner wall time and peak memory (tracemalloc, second run),
remote messages (64 MiB chunks) and flows (sender -> receiver streams), total bytes moved, the
busiest worker's bytes (its busier direction; links are full duplex), the bytes a checkpoint-restart
reads (the full state), whether the plan delivers every byte exactly once (what each new worker
receives plus keeps against its share from the layout's box grids; this was a unit test, moved here
to keep ``make test`` short), and two modelled stalls at --bandwidth-gbps per worker: the link floor
(busiest bytes / bandwidth) and the round schedule of ``rounds.py`` with --streams concurrent
streams per worker and direction. Published figures for GPU clusters (DynaTrain: 70B dense in about
2 s, 235B MoE in 4.36 s) are printed beside the closest model sizes, for reference only.

Usage: python bench/plan_scale.py [--bandwidth-gbps 400] [--streams 1] [--quick]
--quick (64 and 256 workers, plus 70B on 1,024) takes well under a minute; the full run a few minutes.
Never fails on timing.
"""

from __future__ import annotations

import argparse
import gc
import platform
import time
import tracemalloc
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.table import Table

from elastic.core.boxes import box_numel
from elastic.core.config import ModelConfig
from elastic.core.layout import Layout, Placement, TensorSpec, box_grid, grid_index, stage_table
from elastic.model.llama import tensor_specs
from elastic.model.specs import OPT_KEYS
from elastic.plan.planner import ItemSizes, make_plan
from elastic.plan.stream_rounds import link_seconds, lower_bound, schedule, scheduled_seconds

GLOBAL_BATCH = 4096
NODE = 8  # workers per node; tp stays inside a node


@dataclass(frozen=True)
class Job:
    name: str
    model: ModelConfig
    pp: int  # training pipeline depth
    fsdp_nodes: int  # largest HSDP sharding group, in nodes


JOBS = {
    "8B": Job("8B", ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                                vocab_size=128256, max_seq_len=8192), 1, 8),
    "70B": Job("70B", ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                                  vocab_size=128256, max_seq_len=8192), 4, 32),
    "405B": Job("405B", ModelConfig(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248,
                                    vocab_size=128256, max_seq_len=8192), 8, 64),
}
# Published live-reconfiguration times on GPU clusters (DynaTrain, "Fast Online Parallelism Switching for
# Elastic LLM Training", arXiv): a 70B dense model in about 2 s, a 235B MoE in 4.36 s. Not measured here.
PUBLISHED = {"70B": "~2 s (70B dense)", "405B": "4.4 s (235B MoE)"}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def with_microbatches(dp: int, fsdp: int, pp: int, model: ModelConfig) -> Layout | None:
    """The layout with the most micro-batches (a power of two, at most 2*pp) that validates, or None."""
    mb = 1
    while mb * 2 <= 2 * pp:
        mb *= 2
    while mb >= 1:
        layout = Layout(dp=dp, fsdp=fsdp, tp=NODE, pp=pp, microbatches=mb if pp > 1 else 1)
        if layout.is_valid(model, GLOBAL_BATCH):
            return layout
        mb //= 2
    return None


def train_layout(job: Job, nodes: int) -> Layout:
    pp = min(job.pp, nodes)
    fsdp = min(nodes // pp, job.fsdp_nodes)
    layout = with_microbatches(nodes // pp // fsdp, fsdp, pp, job.model)
    assert layout is not None, (job.name, nodes)
    return layout


def nearest_layout(job: Job, nodes: int, old: Layout) -> Layout:
    """After a node joins or leaves: keep tp=8 and shard at least as finely as before (so no worker holds
    more state; else as finely as the node count allows), with the valid pp closest to the training one."""
    need = old.fsdp * old.pp  # nodes each replica's state is spread over
    options = []
    for pp in (p for p in divisors(nodes) if p <= job.model.n_layers):
        for fsdp in divisors(nodes // pp):
            layout = with_microbatches(nodes // pp // fsdp, fsdp, pp, job.model)
            if layout is not None:
                # Enough sharding first, then the pipeline depth we train with, then no needless sharding.
                options.append(((pp * fsdp < min(need, nodes), pp * fsdp < need and -pp * fsdp,
                                 abs(pp - job.pp), pp * fsdp, pp), layout))
    if not options:
        raise ValueError(f"no valid layout for {job.name} on {nodes} nodes")
    return min(options, key=lambda option: option[0])[1]


def training_specs(model: ModelConfig, moments: bool) -> tuple[TensorSpec, ...]:
    params = tensor_specs(model)
    if not moments:
        return tuple(params)
    return tuple(params + [p.renamed(f"{p.name}::{key}") for p in params if p.trainable for key in OPT_KEYS])


def transitions(job: Job, workers: int) -> list[tuple[str, Placement, Placement, bool]]:
    """(name, old, new, with optimizer moments) for one job size."""
    nodes, ids = workers // NODE, tuple(range(workers))
    train = Placement(train_layout(job, nodes), ids)
    gone = (nodes // 2) * NODE  # the drained node sits in the middle: ranks after it shift
    survivors = ids[:gone] + ids[gone + NODE:]
    dp_layout = Layout(dp=max(workers // 64, 1), fsdp=min(workers, 64))
    return [
        ("scale-in 1 node", train, Placement(nearest_layout(job, nodes - 1, train.layout), survivors), True),
        ("scale-out 1 node", train, Placement(nearest_layout(job, nodes + 1, train.layout),
                                              ids + tuple(range(workers, workers + NODE))), True),
        ("dp -> tp x pp", Placement(dp_layout, ids), train, True),
        ("train -> rollout", train, Placement(Layout(dp=nodes, tp=NODE), ids), False),
    ]


def expected_bytes(placement: Placement, specs, sizes, n_layers: int) -> dict[int, int]:
    """Bytes every worker of ``placement`` must end up holding, from the layout's box grids (not the planner's
    pieces): the check that a plan delivers every byte exactly once, at sizes no unit test reaches."""
    layout, out = placement.layout, np.zeros(placement.layout.world, dtype=np.int64)
    stages, grids = stage_table(layout, n_layers), {}
    coords = [layout.coord(r) for r in range(layout.world)]
    for spec in specs:
        key = (spec.shape, spec.tp_dim)
        if key not in grids:
            grids[key] = [box_numel(b) for b in box_grid(layout, *key)]
        stage = stages[spec.layer] if spec.owner == "layer" else layout.stage_of(spec, n_layers)
        for r, c in enumerate(coords):
            if c.pp == stage:
                out[r] += grids[key][grid_index(layout, c, spec.tp_dim)] * sizes(spec)
    return dict(zip(placement.workers, out.tolist(), strict=True))


def exactly_once(plan, old: Placement, new: Placement, specs, sizes, n_layers: int) -> str:
    """"yes" when what each new worker receives plus what it keeps is its new share, the bytes sent equal the bytes
    received and no worker outside the old placement sends; else what failed."""
    sent, received = plan.load_arrays()
    have = dict(zip(plan.worker_ids.tolist(), (received + plan.copied_array()).tolist(), strict=True))
    want = expected_bytes(new, specs, sizes, n_layers)
    wrong = [w for w in new.workers if have.get(w) != want[w]]
    strangers = [w for w, n in zip(plan.worker_ids.tolist(), sent.tolist(), strict=True) if n and w not in old.workers]
    if wrong or strangers or sent.sum() != received.sum():
        return f"NO: workers {wrong[:3]} hold the wrong bytes, {strangers[:3]} send without holding"
    return "yes"


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:,.1f}" if nbytes >= 1e8 else f"{nbytes / 1e9:,.3f}"


def measure(job: Job, name: str, old: Placement, new: Placement, moments: bool, args) -> list[str]:
    specs, sizes = training_specs(job.model, moments), ItemSizes.adamw()
    gc.collect()
    started = time.perf_counter()
    plan = make_plan(old, new, specs, job.model.n_layers, sizes)
    plan_s = time.perf_counter() - started
    sent, received = plan.load_arrays()
    busiest = int(max(sent.max(), received.max()))
    messages, _ = plan.counts()
    moved = plan.bytes_moved()
    exact = exactly_once(plan, old, new, specs, sizes, job.model.n_layers)
    src, dst, nbytes = plan.flows()
    del plan
    full_state = sum(s.numel * sizes(s) for s in specs)
    bandwidth = args.bandwidth_gbps * 1e9 / 8
    rounds = schedule(src, dst, nbytes, args.streams)
    n_rounds = int(rounds.max()) + 1 if len(rounds) else 0
    stall_link = link_seconds(src, dst, nbytes, bandwidth)
    stall_rounds = scheduled_seconds(src, dst, nbytes, rounds, bandwidth, args.round_latency_us * 1e-6)
    bound = lower_bound(src, dst, args.streams)
    peak = "-"
    if not args.no_memory:  # a second run under tracemalloc: it slows Python code, so it is not the timed one
        gc.collect()
        tracemalloc.start()
        plan = make_plan(old, new, specs, job.model.n_layers, sizes)
        peak = f"{tracemalloc.get_traced_memory()[1] / 1e6:,.0f}"
        tracemalloc.stop()
        del plan
    return [job.name, f"{old.layout.world}->{new.layout.world}", name + ("" if moments else " (weights)"),
            f"{old.layout} -> {new.layout}", f"{plan_s:.2f}", peak, f"{messages:,}", f"{len(src):,}", gb(moved),
            gb(busiest), gb(full_state), f"{stall_link:.3f}", f"{stall_rounds:.3f}", f"{n_rounds}/{bound}", exact,
            PUBLISHED.get(job.name, "")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bandwidth-gbps", type=float, default=400.0, help="link bandwidth per worker, Gb/s")
    parser.add_argument("--streams", type=int, default=1, help="concurrent streams per worker and direction")
    parser.add_argument("--round-latency-us", type=float, default=0.0, help="fixed cost per round, microseconds")
    parser.add_argument("--quick", action="store_true", help="64 and 256 workers (and 70B on 1,024) only")
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc run")
    parser.add_argument("--models", default="8B,70B,405B", help="comma-separated subset of 8B,70B,405B")
    parser.add_argument("--workers", default="64,256,1024,4096", help="comma-separated cluster sizes")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown (for docs)")
    args = parser.parse_args()
    console = Console(width=250)
    console.print(f"plan_scale: {time.strftime('%Y-%m-%d')}, {platform.machine()} {platform.system()}, "
                  f"python {platform.python_version()}; link {args.bandwidth_gbps:g} Gb/s per worker, "
                  f"{args.streams} stream(s) per worker and direction; bf16 weights + fp32 AdamW moments")
    sizes = [int(w) for w in args.workers.split(",")]
    cases = [(JOBS[m], w) for m in args.models.split(",") for w in sizes if not args.quick or w <= 256]
    if args.quick and "70B" in args.models.split(","):
        cases.append((JOBS["70B"], 1024))
    table = Table(title="Reshard plans at cluster scale (simulated; no tensors, no processes)")
    columns = ["model", "workers", "transition", "layouts", "plan s", "peak MB", "messages", "flows",
               "moved GB", "busiest GB", "restart GB", "stall link s", "stall rounds s", "rounds/LB", "every byte once",
               "published"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "transition", "layouts", "published") else "right")
    rows = []
    for job, workers in cases:
        for name, old, new, moments in transitions(job, workers):
            rows.append(measure(job, name, old, new, moments, args))
            table.add_row(*rows[-1])
            console.print(" | ".join(rows[-1]), style="dim")  # progress, one line per plan
    console.print(table)
    console.print("published (DynaTrain, GPU clusters; reference only): a 70B dense model reconfigures in about 2 s, "
                  "a 235B MoE in 4.36 s. The stalls above come from a per-link model, not a measurement")
    if args.markdown:
        print("| " + " | ".join(columns) + " |")
        print("|" + "|".join("---" for _ in columns) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
