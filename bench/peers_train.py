"""The training loop the peers run in ``bench/peers.py``: what a user writes for torchrun or Ray Train.

Data-parallel training (DDP over gloo on CPU) of the project's Llama-style model, global batch split
across ranks, AdamW, a DCP checkpoint every ``--ckpt-every`` steps, and a resume from the newest one
at start. Rank 0 appends a line to ``--step-log`` when each step begins and ends, so the benchmark can time
a restart from outside. Two ways in:

- torchrun: ``torchrun ... bench/peers_train.py --step-log L --ckpt-dir D`` (the elastic agent restarts it);
- Ray Train v2: ``TorchTrainer(lambda: loop(args, ray_train=True))``; checkpoints go through
  ``ray.train.report`` and come back through ``ray.train.get_checkpoint`` after a restart.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from elastic.core.boxes import balanced
from elastic.core.config import MODEL_PRESETS, DataConfig
from elastic.core.data import GlobalSampler, build_dataset
from elastic.model.init import init_tensor
from elastic.model.llama import LlamaStage, tensor_specs


def arguments(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="25m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--ckpt-every", type=int, default=4)
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--step-log", dest="log", required=True)
    p.add_argument("--preemption", action="store_true", help="Ray Train: on a preemption notice "
                   "(ray.train.get_preemption_info, asked after every step) checkpoint at once, as Ray's docs advise")
    p.add_argument("--node-tag", default="", help="ignored: marks the processes of one torchrun agent for pkill")
    return p.parse_args(argv)


def note(path: str, **entry) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps({"time": time.time(), **entry}) + "\n")


def newest(ckpt_dir: Path) -> Path | None:
    done = sorted(ckpt_dir.glob("step_*/done"))
    return done[-1].parent if done else None


def loop(args: argparse.Namespace, ray_train: bool = False) -> None:
    if ray_train:
        import ray.train

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
    else:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    cfg = MODEL_PRESETS[args.model]
    model = LlamaStage(cfg)
    specs = {s.name: s for s in tensor_specs(cfg)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_tensor(specs[name], cfg, 0, torch.float32))
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = build_dataset(DataConfig(dataset="stdlib", seq_len=args.seq, max_corpus_bytes=1_000_000), 0)
    sampler = GlobalSampler(len(data), args.batch, 0)
    ckpt_dir, step = Path(args.ckpt_dir), 0
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    source = None
    if ray_train:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            source = checkpoint.to_directory()
    else:
        source = newest(ckpt_dir)
    if source is not None:  # resume: every rank loads the newest complete checkpoint
        dcp.load(state, checkpoint_id=str(source))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        step = int((Path(source) / "step").read_text())
    if rank == 0:
        note(args.log, event="resumed", step=step, world=world, pid=os.getpid())
    note(args.log + f".rank{rank}", event="pid", pid=os.getpid(), world=world)
    saved_on_notice = False
    while step < args.steps:
        if rank == 0:
            note(args.log, event="begin", step=step, world=world)
        lo, hi = balanced(args.batch, world, rank)
        x, y = data.batch(sampler.step_indices(step)[lo:hi])
        logits = ddp(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad()
        step += 1
        if rank == 0:
            note(args.log, event="end", step=step - 1, world=world, loss=float(loss.detach()))
        noticed = False
        if args.preemption and not saved_on_notice:  # every rank asks, every step (it is a barrier)
            noticed = saved_on_notice = ray.train.get_preemption_info() is not None
        if step % args.ckpt_every == 0 or noticed:
            save(args, ckpt_dir / f"step_{step:06d}", model, opt, step, rank, ray_train)
            if rank == 0 and noticed:
                note(args.log, event="checkpoint on notice", step=step, world=world)


def save(args, folder: Path, model, opt, step: int, rank: int, ray_train: bool) -> None:
    """A DCP checkpoint of every rank's state; through ``ray.train.report`` under Ray Train."""
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=str(folder))
    if rank == 0:
        (folder / "step").write_text(str(step))
        (folder / "done").write_text("")
    if ray_train:
        import ray.train
        from ray.train import Checkpoint

        ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(str(folder)) if rank == 0 else None)


if __name__ == "__main__":
    loop(arguments())
