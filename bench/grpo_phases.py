"""Phase-aware relayout for RL: GRPO's rollout and update phases on one layout or on two.

Rollouts want replicas (every worker holds the whole policy and samples its own prompts); the
update can use fsdp or tp. This runs the same GRPO job (same prompts, seeds and steps) three ways
on 4 workers and prints the time spent in rollouts, in updates and in reshards:
- a fixed data-parallel layout (dp=4) for both phases, the baseline;
- the layouts pinned per phase by the operator (rollout dp=4, update fsdp=4): a relayout at
  every phase boundary;
- the controller's cost model deciding at each phase boundary whether a relayout pays.

Usage: python bench/grpo_phases.py [--model mini] [--steps 8] [--prompts 16]
Never fails on timing.
"""

from __future__ import annotations

import argparse

import ray
from rich.console import Console
from rich.table import Table

from elastic.control.run import run_job, with_control
from elastic.core.config import MODEL_PRESETS
from elastic.core.layout import Layout
from elastic.recipes.grpo.recipe import grpo_config
from elastic.recipes.grpo.workload import GRPOWorkload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--steps", type=int, default=8, help="GRPO steps")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per GRPO step (8 completions each)")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    cfg = grpo_config(steps=args.steps, workers=4, prompts_per_step=args.prompts, lora=False)
    cfg = cfg.replace(model=MODEL_PRESETS[args.model])
    runs = {
        "fixed dp=4 (baseline)": with_control(cfg, layout=Layout(dp=4), phase_layouts={"train": Layout(dp=4)}),
        "pinned: rollout dp=4, update fsdp=4": with_control(
            cfg, layout=Layout(dp=4), phase_layouts={"rollout": Layout(dp=4), "train": Layout(fsdp=4)}),
        "cost model decides": with_control(cfg, layout=Layout(dp=4)),
    }
    table = Table(title=f"GRPO phases ({args.model}, {args.steps} steps x {args.prompts} prompts x 8 completions, "
                        "4 workers)")
    for col in ("run", "rollouts s", "updates s", "reshards s", "relayouts", "total s", "vs baseline"):
        table.add_column(col, justify="left" if col == "run" else "right")
    baseline = None
    for name, run_cfg in runs.items():
        workload = GRPOWorkload(run_cfg)
        result, _ = run_job(run_cfg, workload, progress=False, gather_tensors=False)
        reshard_s = sum(r.total_seconds for r in result.reshards)
        total = workload.seconds["rollout"] + workload.seconds["train"] + reshard_s
        baseline = baseline or total
        table.add_row(name, f"{workload.seconds['rollout']:.1f}", f"{workload.seconds['train']:.1f}",
                      f"{reshard_s:.1f}", str(len(result.reshards)), f"{total:.1f}", f"{total / baseline:.2f}")
    Console(width=150).print(table)
    ray.shutdown()


if __name__ == "__main__":
    main()
