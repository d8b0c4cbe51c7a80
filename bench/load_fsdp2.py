"""The plain-FSDP2 baseline of ``bench/load.py``: what a torchrun user writes, on the same folder and batch.

Launched by ``torchrun --standalone --nproc-per-node 4`` (gloo, CPU, one torch thread per process, as our
workers). Every rank loads the whole HF folder with transformers (``from_pretrained``), applies PEFT's LoRA
r=16 on the same projections for ``--mode lora``, then ``fully_shard`` on each decoder layer and on the root, the way
torchtitan's ``parallelize`` does. Each rank takes its ``batch / world`` rows of the global batch (data
parallel over the shards), and every step is forward, loss, backward, ``clip_grad_norm_(1.0)`` (our
``optim.grad_clip`` default) and AdamW, as our engine's step.

``--mixed``: bf16 compute over float32 weights, gradients and moments. ``autocast`` (the default) is our
``train.mixed_precision = "bf16"`` (design.md item 40: float32 master weights, the forward under
``torch.autocast``, so FSDP gathers float32); ``policy`` is FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=float32)``, which gathers bf16 and runs the whole layer in bf16 (cheaper, different math).
``--mixed no``: pure bf16 (weights and moments in bf16).

Measured per rank: idle RSS (torch, transformers and the gloo group up, no model), peak RSS during the load
and during the steps (the high-water mark reset after the load: Linux's ``/proc/self/clear_refs``), each
step's seconds. Rank 0 prints one line ``RESULT {json}``: per-rank lists, and the median of the steps after
the first.

Usage: torchrun --standalone --nproc-per-node 4 bench/load_fsdp2.py --folder DIR [--mode lora|full] [--batch 4]
       [--seq 16] [--steps 4] [--mixed autocast|policy|no]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # bench/load.py's


def status() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process, MB."""
    fields = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024 / 1e6
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def build(folder: str, mode: str, mixed: str) -> torch.nn.Module:
    """The sharded model: transformers' load, PEFT for LoRA, fully_shard per decoder layer and at the root."""
    import peft
    import transformers
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = torch.bfloat16 if mixed == "no" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if mode == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed == "policy" else MixedPrecisionPolicy()
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # the whole model each rank loaded is freed: give it back
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--mode", choices=("lora", "full"), default="lora")
    parser.add_argument("--batch", type=int, default=4, help="global batch (rows), split over the ranks")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--mixed", choices=("autocast", "policy", "no"), default="autocast")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the {world} ranks (each takes batch/world rows)")
    idle, _ = status()
    reset_peak()
    started = time.perf_counter()
    model = build(args.folder, args.mode, args.mixed)
    dist.barrier()
    if rank == 0:
        print(f"loaded and sharded in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    load_s, (_, load_peak) = time.perf_counter() - started, status()
    reset_peak()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    rows = torch.randint(0, 259, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    mine = rows.chunk(world)[rank]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.mixed == "autocast" else contextlib.nullcontext()
    seconds = []
    for _ in range(args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        with autocast:
            loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
        if rank == 0:
            print(f"step {len(seconds)}: {seconds[-1]:.1f} s", file=sys.stderr, flush=True)
    _, step_peak = status()
    mine_result = {"idle": idle, "load_peak": load_peak, "step_peak": step_peak, "load_s": load_s, "seconds": seconds}
    results = [None] * world if rank == 0 else None
    dist.gather_object(mine_result, results, dst=0)
    if rank == 0:
        steady = [max(r["seconds"][i] for r in results) for i in range(1, args.steps)] or [results[0]["seconds"][0]]
        print("RESULT " + json.dumps({"ranks": results, "first_s": max(r["seconds"][0] for r in results),
                                      "median_s": statistics.median(steady)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
