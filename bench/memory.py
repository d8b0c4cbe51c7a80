"""Where a worker's memory goes during one training step, by phase: the 494M Qwen2-shaped bf16 folder of
``bench/load.py`` (or the same width with ``--layers N``), 4 workers on fsdp=4, LoRA r=16 and full fine-tuning.

Each worker samples its own resident memory (Linux's VmRSS, and VmHWM reset at every phase boundary, so each
phase's own peak is read) at: after load, after the forward (a forward hook registered after FSDP's, so after its
reshard), after the loss, after the backward (where the engine clips), after the optimizer step (AdamW's post
hook), and after the step (the engine's update applied and its gradients dropped, after ``gc.collect``). The
probes are worker tasks (``bench/probes.py``'s style) that hook the engine the worker built; the step itself is
the group's ordinary ``step``.

Printed per mode: phase x (peak and end RSS above the worker's idle RSS, MB, the busiest worker and each worker's
peak) against the worker's share of the training state (its boxes of the weights plus AdamW moments, at
``train.dtype``'s itemsize) and an activations estimate: the planner's uncalibrated ``activations`` and ``logits``
terms (``plan/memory.py``), with the logits cut to the one chunk the loss holds at a time (``model/loss.py``):
rows x seq_len x layers x (6 dim + 4 q + 3 kv + 4 ffn) x b, plus min(rows x seq_len, chunk) x vocab x (b + 4),
with rows per worker, q and kv the attention widths and b the compute itemsize. Target (issue 25): peak above
idle <= 1.5x (share + activations). Never fails.

Usage: nice -n 10 python bench/memory.py [--layers 4] [--batch 4] [--seq 16] [--modes lora,full] [--whole-loss]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from load import SHAPE, write_folder
from probes import memory

MB = 1e6


def _status(pid: int | str = "self") -> tuple[int, int]:
    """(VmRSS, VmHWM) bytes of process ``pid``."""
    fields = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def _sample(phases: list, name: str) -> None:
    """Append (phase, resident bytes now, peak resident bytes since the previous sample) and restart the peak."""
    phases.append((name, *_status()))
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


@dataclass(frozen=True)
class Pid:
    """The worker's process id: the driver reads its load peak from /proc before a task resets it (every task
    call restarts the peak, ``runtime/worker.py``)."""

    needs_engine: ClassVar[bool] = False

    def run(self, ctx) -> int:
        import os

        return os.getpid()


@dataclass(frozen=True)
class WatchPhases:
    """Hook this worker's engine so that its next step samples memory at each phase boundary (into scratch).
    ``whole_loss``: compute the loss over the whole vocabulary at once, as before ``model/loss.py`` chunked it
    (the before/after of that change in one build of the code)."""

    whole_loss: bool = False
    needs_engine: ClassVar[bool] = True

    def run(self, ctx) -> bool:
        from elastic.model import loss
        from elastic.runtime import engine as engine_module

        if self.whole_loss:
            loss.CHUNK_LOGIT_BYTES = 2**62

        phases = ctx.scratch.setdefault("phases", [])
        engine = ctx.engine
        _sample(phases, "before the step")  # restarts the peak: the next phase's starts here
        engine.module.register_forward_hook(lambda *_: _sample(phases, "forward"), always_call=True)
        loss_sum, clip = engine_module.causal_lm_loss_sum, engine_module.clip_grad_norm_

        def sampled_loss(*args, **kwargs):
            out = loss_sum(*args, **kwargs)
            _sample(phases, "loss")
            return out

        def sampled_clip(*args, **kwargs):
            _sample(phases, "backward")
            return clip(*args, **kwargs)

        engine_module.causal_lm_loss_sum, engine_module.clip_grad_norm_ = sampled_loss, sampled_clip
        engine.optimizer.register_step_pre_hook(lambda *_: _sample(phases, "clip, wait for commit"))
        engine.optimizer.register_step_post_hook(lambda *_: _sample(phases, "optimizer step"))
        return True


@dataclass(frozen=True)
class ReadPhases:
    """The samples of the step just taken, with one more after it: (phase, RSS bytes at its end, its peak)."""

    needs_engine: ClassVar[bool] = True

    def run(self, ctx) -> list:
        import ctypes

        phases = ctx.scratch.get("phases", [])
        gc.collect()
        _sample(phases, "after the step")
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # what glibc's arenas cache, not the state: returned to the OS
        _sample(phases, "after malloc_trim")
        return phases


def measure(base: Path, mode: str, batch: int, seq: int, whole_loss: bool = False, workers: int = 4) -> dict:
    """One mode's run: idle RSS, per-worker phase samples, share and activations estimate (bytes)."""
    import ray

    from elastic.core.layout import Layout, Placement
    from elastic.driver.ray_group import RayWorkerGroup
    from elastic.model.loss import chunk_positions
    from elastic.model.specs import DTYPE, param_specs, training_specs
    from elastic.plan.memory import MemoryModel
    from elastic.recipes.lora.recipe import lora_config

    cfg = lora_config(base, steps=100, global_batch=batch, seq_len=seq, dtype="bfloat16", peft=mode == "lora",
                      workers=workers)
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, dataset="stdlib", tokenizer="", max_corpus_bytes=1_000_000),
                      runtime=dataclasses.replace(cfg.runtime, collective_timeout_s=900, store_timeout_s=300))
    layout = Layout(fsdp=workers)
    ray.init(address="local", num_cpus=workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    group = RayWorkerGroup(cfg)
    try:
        ids = tuple(group.spawn(workers))
        pids = group.run({w: Pid() for w in ids})
        idle = {w: m["rss"] for w, m in memory(group, ids, reset_peak=True).items()}
        group.setup(Placement(layout, ids))
        loaded = {w: _status(pids[w]) for w in ids}  # before any task call restarts the peak
        group.run({w: WatchPhases(whole_loss) for w in ids})
        group.step()
        phases = group.run({w: ReadPhases() for w in ids})
        for w in ids:
            phases[w].insert(0, ("after load", *loaded[w]))
    finally:
        group.shutdown()
        ray.shutdown()
    itemsize = DTYPE[cfg.train.dtype].itemsize
    trainable = sum(s.numel for s in param_specs(cfg) if s.trainable)
    state = sum(s.numel for s in training_specs(cfg)) * itemsize  # weights + moments of the trainable ones
    terms = MemoryModel(cfg).estimate(layout).terms
    # The planner counts the micro-batch's whole logits; the loss keeps one chunk of them (model/loss.py).
    positions = -(-batch // workers) * seq
    logits = terms["logits"] * (1 if whole_loss else min(1.0, chunk_positions(cfg.model.vocab_size) / positions))
    return {"idle": idle, "phases": phases, "share": state / workers, "grads": trainable * itemsize / workers,
            "activations": terms["activations"] + logits, "logits": logits}


def report(mode: str, r: dict, batch: int, seq: int, layers: int) -> float:
    """Print one mode's table; return its peak above idle / (share + activations)."""
    from rich.console import Console
    from rich.table import Table

    workers = sorted(r["phases"])
    names = [name for name, _, _ in r["phases"][workers[0]]]  # the same on every worker
    table = Table(title=f"{mode}: one step, {layers} layers, fsdp={len(workers)}, batch {batch} x {seq}, "
                        f"MB above each worker's idle RSS")
    for col in ("phase", "peak (busiest)", "end (busiest)", *(f"peak w{w}" for w in workers), "share",
                "activations est."):
        table.add_column(col, justify="left" if col == "phase" else "right")
    top = 0.0
    for i, name in enumerate(names):
        peaks = {w: (r["phases"][w][i][2] - r["idle"][w]) / MB for w in workers}
        ends = {w: (r["phases"][w][i][1] - r["idle"][w]) / MB for w in workers}
        top = max(top, *peaks.values())
        table.add_row(name, f"{max(peaks.values()):,.0f}", f"{max(ends.values()):,.0f}",
                      *(f"{peaks[w]:,.0f}" for w in workers), f"{r['share'] / MB:,.0f}",
                      f"{r['activations'] / MB:,.0f}")
    Console(width=200).print(table)
    floor = (r["share"] + r["activations"]) / MB
    ratio = top / floor
    print(f"{mode}: peak {top:,.0f} MB above idle = {ratio:.2f}x (share {r['share'] / MB:,.0f} + activations "
          f"{r['activations'] / MB:,.0f} MB, of which logits {r['logits'] / MB:,.0f}; gradients "
          f"{r['grads'] / MB:,.0f} MB not in the floor); target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'}; "
          f"idle RSS {max(r['idle'].values()) / MB:,.0f} MB", flush=True)
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--whole-loss", action="store_true", help="the loss over the whole vocabulary at once "
                        "(as before model/loss.py chunked it)")
    args = parser.parse_args()
    base = write_folder(args.layers)  # bench/load.py's folder, or one of --layers layers beside it
    for mode in args.modes.split(","):
        name = f"{mode}, whole-vocabulary loss" if args.whole_loss else mode
        report(name, measure(base, mode, args.batch, args.seq, args.whole_loss), args.batch, args.seq, args.layers)


if __name__ == "__main__":
    main()
