"""Training a user's model at size: a Qwen2.5-0.5B-shaped folder (494M parameters, bf16, tied embeddings),
random weights written once by transformers and cached under runs/bench-load/ (``--layers N``: the same width
with N decoder layers, to iterate in a minute or two).

For LoRA r=16 and for full fine-tuning (``--modes lora,full``), both in mixed precision as TRL's ``bf16: true``
(bf16 matmuls under ``torch.autocast`` over float32 weights, gradients and AdamW moments: ours is
``train.mixed_precision = "bf16"``, design.md item 40), three runs on the same folder and batch, in this run:
- this project: 4 warm workers on fsdp=4, each reading only its own boxes of the safetensors file, then
  ``--steps`` steps, then the workers write the export (``driver/exporter.py``: the adapter, or the HF folder);
- torchrun with four processes running plain FSDP2 (``bench/load_fsdp2.py``: transformers' load, PEFT's LoRA,
  ``fully_shard`` per decoder layer and at the root, autocast): the steady-state overhead target;
- transformers + PEFT in one process (``from_pretrained``, the same steps under autocast).

Reported per run: seconds to loaded, the first step and the median of the steady steps (the slowest rank's);
peak RSS above the process's idle RSS (torch loaded, no model) by phase: load, first step, steady steps and,
ours, the export (workers and the driver) against the worker's share of the state (weights + AdamW moments,
float32, divided by the workers; the whole state for one process) plus activations (the planner's uncalibrated
``activations + logits`` terms, ``plan/memory.py``); the planner's predicted step peak against the measured
one (target within 25%); our steady step time over FSDP2's (target <= 1.05x) and our step peak over FSDP2's
(target <= 1.0x); the driver's peak RSS while the workers export. Each is printed with whether its target is
met. Never fails on a missed target. Per-phase detail inside a step (forward, backward, optimizer):
``bench/memory.py``.

Every process the bench starts is ended by it: Ray's local cluster by ``ray.shutdown``, each child process
by its process group (torchrun's workers run in sessions of their own: each is killed by its group too).

Usage: nice -n 10 python bench/load.py [--layers 24] [--modes lora,full] [--batch 4] [--seq 16] [--steps 4]
       [--no-fsdp2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "runs" / "bench-load" / "qwen2-0.5b-bf16"
SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1000000.0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MB = 1e6


def write_folder(layers: int = SHAPE["num_hidden_layers"]) -> Path:
    """The bench folder (``FOLDER``), or one of ``layers`` layers at the same width beside it (bench/memory.py's
    name for it); written once, random bf16 weights."""
    folder = FOLDER if layers == SHAPE["num_hidden_layers"] else FOLDER.with_name(f"{FOLDER.name}-{layers}layers")
    if not (folder / "tokenizer.json").is_file():
        from elastic.tools.tiny_hf import write_tokenizer

        folder.mkdir(parents=True, exist_ok=True)
        write_tokenizer(folder)  # a small BPE: a real folder's tokenizer would be larger, the model the same
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    import transformers

    print(f"writing {folder} once (random weights, bf16) ...", flush=True)
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**{**SHAPE, "num_hidden_layers": layers}, dtype="bfloat16")
    transformers.Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def status(pid: int | str = "self") -> tuple[float, float]:
    """(VmRSS, VmHWM) of process ``pid``, MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024 / MB
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def transformers_run(folder: Path, mode: str, batch: int, seq: int, steps: int) -> None:
    """In a fresh process: from_pretrained (float32), PEFT's LoRA for ``lora``, ``steps`` steps under autocast.
    Prints RESULT json (MB and seconds)."""
    import peft
    import torch
    import transformers

    torch.set_num_threads(1)  # as each of our workers and each torchrun rank
    idle = status()[0]
    reset_peak()
    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if mode == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    load_s, load_peak = time.perf_counter() - started, status()[1]
    reset_peak()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randint(0, 259, (batch, seq), generator=torch.Generator().manual_seed(0))
    seconds, peaks = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
        peaks.append(status()[1] - idle)
        reset_peak()
    print("RESULT " + json.dumps({"load_s": load_s, "load": load_peak - idle, "first": peaks[0], "steady": max(
        peaks[1:] or peaks), "first_s": seconds[0], "step_s": statistics.median(seconds[1:] or seconds), "idle": idle}))


def child(cmd: list[str], timeout: float) -> dict:
    """Run ``cmd`` in a session of its own and return its ``RESULT`` json; every process it started is killed on
    the way out (its group, and the groups of its descendants: torchrun starts each rank in a new session)."""
    proc = subprocess.Popen(["nice", "-n", "10", *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        proc.wait()
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"{' '.join(cmd[:3])} failed: {err.strip().splitlines()[-3:]}")
    return json.loads(lines[-1][7:])


def descendants(root: int) -> list[int]:
    """Live descendants of ``root`` (from /proc's parent links)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [root]
    while frontier:
        kids = [pid for pid, ppid in parents.items() if ppid in frontier]
        found += kids
        frontier = kids
    return found


def fsdp2_run(folder: Path, mode: str, batch: int, seq: int, steps: int) -> dict:
    """torchrun's four ranks of plain FSDP2 (bench/load_fsdp2.py): the busiest rank's peaks above its idle."""
    r = child([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
               str(ROOT / "bench" / "load_fsdp2.py"), "--folder", str(folder), "--mode", mode, "--batch", str(batch),
               "--seq", str(seq), "--steps", str(steps)], timeout=3600)
    ranks = r["ranks"]
    return {"load_s": max(x["load_s"] for x in ranks), "load": max(x["load_peak"] - x["idle"] for x in ranks),
            "first": None, "steady": max(x["step_peak"] - x["idle"] for x in ranks), "first_s": r["first_s"],
            "step_s": r["median_s"], "idle": max(x["idle"] for x in ranks)}


def elastic_run(folder: Path, mode: str, batch: int, seq: int, steps: int) -> dict:
    """This project: 4 workers, fsdp=4, ``steps`` steps, then the workers' export. MB and seconds."""
    import ray

    from elastic.core.layout import Layout, Placement
    from elastic.driver.exporter import export_from_workers
    from elastic.driver.ray_group import RayWorkerGroup
    from elastic.model.specs import training_specs
    from elastic.plan.memory import MemoryModel
    from elastic.recipes.lora.recipe import lora_config

    cfg = lora_config(folder, steps=100, global_batch=batch, seq_len=seq, dtype="float32", peft=mode == "lora")
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, mixed_precision="bf16"),
                      data=dataclasses.replace(cfg.data, dataset="stdlib", tokenizer="", max_corpus_bytes=1_000_000),
                      runtime=dataclasses.replace(cfg.runtime, collective_timeout_s=900, store_timeout_s=300))
    layout, out = Layout(fsdp=4), ROOT / "runs" / "bench-load" / f"export-{mode}"
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    group = RayWorkerGroup(cfg)
    try:
        workers = tuple(group.spawn(4))
        pids = {w: group.members.info[w]["pid"] for w in workers}
        idle = {w: group.members.info[w]["idle_rss"] / MB for w in workers}
        started = time.perf_counter()
        group.setup(Placement(layout, workers))
        load_s = time.perf_counter() - started
        load = max(status(pids[w])[1] - idle[w] for w in workers)  # before any task restarts the peak
        seconds, peaks = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            results = group.step()
            seconds.append(time.perf_counter() - t0)
            peaks.append(max(r.peak_bytes for r in results.values()) / MB)  # above each worker's idle RSS
        driver_before = status()[0]
        reset_peak()
        export = export_from_workers(group, cfg, out)
        driver_peak = status()[1]
        export_peak = max(status(pids[w])[1] - idle[w] for w in workers)  # WriteExport restarted the peak
    finally:
        group.shutdown()
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)
    model = MemoryModel(cfg)
    estimate = model.estimate(layout)
    return {"load_s": load_s, "load": load, "first": peaks[0], "steady": max(peaks[1:] or peaks),
            "first_s": seconds[0], "step_s": statistics.median(seconds[1:] or seconds), "idle": max(idle.values()),
            "export": export_peak, "driver_before": driver_before, "driver_peak": driver_peak,
            "driver_bytes": export.driver_bytes, "largest": export.largest_bytes / MB,
            "written": export.written_bytes / MB, "predicted": estimate.step_bytes / MB, "moment": estimate.moment,
            "terms": {k: v / MB for k, v in estimate.terms.items() if v and k != "reshard"},
            "state": sum(s.numel for s in training_specs(cfg)) * 4 / MB,
            "activations": sum(model.activations(layout)) / MB, "activations_1": sum(model.activations(Layout())) / MB}


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report(mode: str, layers: int, args, ours: dict, fsdp2: dict | None, theirs: dict) -> None:
    """One mode's table and its targets (``fsdp2`` None: that baseline was not run, ``--no-fsdp2``)."""
    from rich.console import Console
    from rich.table import Table

    share, acts = ours["state"] / 4, ours["activations"]
    what = "LoRA r=16" if mode == "lora" else "full fine-tuning"
    table = Table(title=f"{what}: Qwen2 folder of {layers} layers at 0.5B's width, batch {args.batch} x {args.seq}, "
                        f"bf16 autocast over float32 state; MB above each process's idle RSS (busiest process)")
    for col in ("run", "processes", "s to loaded", "s first step", "s/step (median, steps 2+)", "load",
                "first step", "steady steps", "export", "share + activations", "steady / (share + act.)"):
        table.add_column(col, justify="left" if col == "run" else "right")
    rows = (("this project, fsdp=4", ours, 4, share + acts), ("torchrun + FSDP2 fully_shard", fsdp2, 4, share + acts),
            ("transformers + PEFT, one process" if mode == "lora" else "transformers, one process", theirs, 1,
             ours["state"] + ours["activations_1"]))
    for name, r, n, floor in (row for row in rows if row[1] is not None):
        cells = [r.get(k) for k in ("load", "first", "steady", "export")]
        table.add_row(name, str(n), f"{r['load_s']:.1f}", f"{r['first_s']:.1f}", f"{r['step_s']:.2f}",
                      *(f"{c:,.0f}" if c is not None else "-" for c in cells), f"{floor:,.0f}",
                      f"{r['steady'] / floor:.2f}")
    Console(width=200).print(table)
    floor_ratio, model_ratio = ours["steady"] / (share + acts), ours["predicted"] / max(ours["steady"], 1e-9)
    print(f"{mode}: share {share:,.0f} MB per worker (state {ours['state']:,.0f} MB: float32 weights + moments), "
          f"activations {acts:,.0f} MB per worker ({ours['activations_1']:,.0f} in one process; the planner's "
          f"activations + logits, uncalibrated); idle RSS: ours {ours['idle']:,.0f}, FSDP2 "
          f"{fsdp2['idle'] if fsdp2 else float('nan'):,.0f}, transformers {theirs['idle']:,.0f} MB")
    against_fsdp2(mode, ours, fsdp2)
    print(f"{mode}: our steady peak / (share + activations) = {floor_ratio:.2f}x (target <= 1.5x: "
          f"{verdict(floor_ratio <= 1.5)})")
    terms = ", ".join(f"{k} {v:,.0f}" for k, v in ours["terms"].items())
    print(f"{mode}: memory model (uncalibrated) for fsdp=4: predicted {ours['predicted']:,.0f} MB at "
          f"{ours['moment']} ({terms}), measured {ours['steady']:,.0f} MB: {model_ratio:.2f}x (target within 25%: "
          f"{verdict(abs(model_ratio - 1) <= 0.25)})")
    print(f"{mode}: the driver while the workers export ({ours['written']:,.0f} MB written, largest tensor "
          f"{ours['largest']:,.0f} MB): peak RSS {ours['driver_peak']:,.0f} MB, "
          f"{ours['driver_peak'] - ours['driver_before']:,.0f} MB above its RSS before the export; it received "
          f"{ours['driver_bytes']} tensor bytes")
    print(f"{mode}: machine load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} (1, 5, 15 min) after these "
          f"runs, on {os.cpu_count()} cores: step times are only comparable on a quiet machine; RSS does not depend "
          f"on it", flush=True)


def against_fsdp2(mode: str, ours: dict, fsdp2: dict | None) -> None:
    """The steady-state targets against torchrun + FSDP2, or why they were not measured."""
    if fsdp2 is None:
        print(f"{mode}: our step and peak against FSDP2's: not measured (--no-fsdp2: its four ranks and ours, one "
              f"after the other, would not both fit this machine's memory beside the other work on it)")
        return
    time_ratio, mem_ratio = ours["step_s"] / fsdp2["step_s"], ours["steady"] / max(fsdp2["steady"], 1e-9)
    print(f"{mode}: our step / FSDP2's step = {ours['step_s']:.2f} / {fsdp2['step_s']:.2f} s = {time_ratio:.2f}x "
          f"(target <= 1.05x: {verdict(time_ratio <= 1.05)})")
    print(f"{mode}: our steady peak / FSDP2's = {ours['steady']:,.0f} / {fsdp2['steady']:,.0f} MB = {mem_ratio:.2f}x "
          f"(target <= 1.0x: {verdict(mem_ratio <= 1.0)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=16)  # bf16 matmuls are slow on this CPU: a small step
    parser.add_argument("--steps", type=int, default=4, help="steps per run: the first, then steady ones")
    parser.add_argument("--no-fsdp2", action="store_true", help="skip the torchrun + FSDP2 baseline (when its "
                        "ranks would not fit the machine's memory)")
    parser.add_argument("--transformers-only", choices=("lora", "full"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    modes = args.modes.split(",")
    if bad := set(modes) - {"lora", "full"}:
        raise SystemExit(f"--modes {args.modes}: unknown {sorted(bad)}; use lora, full or lora,full")
    if args.steps < 2 or args.batch % 4:
        raise SystemExit(f"--steps {args.steps} --batch {args.batch}: need >= 2 steps (a first and a steady one) "
                         f"and a batch that is a multiple of the 4 workers")
    folder = write_folder(args.layers)
    shape = ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
    if args.transformers_only:
        transformers_run(folder, args.transformers_only, args.batch, args.seq, args.steps)
        return
    for mode in modes:  # one run at a time: the machine's cores are shared by all three
        print(f"{mode}: this project ...", file=sys.stderr, flush=True)
        ours = elastic_run(folder, mode, args.batch, args.seq, args.steps)
        print(f"{mode}: torchrun + FSDP2 ...", file=sys.stderr, flush=True)
        fsdp2 = None if args.no_fsdp2 else fsdp2_run(folder, mode, args.batch, args.seq, args.steps)
        print(f"{mode}: transformers ...", file=sys.stderr, flush=True)
        theirs = child([sys.executable, __file__, "--layers", str(args.layers), "--transformers-only", mode, *shape],
                       timeout=3600)
        report(mode, args.layers, args, ours, fsdp2, theirs)


if __name__ == "__main__":
    main()
