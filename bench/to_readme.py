"""Copy the benchmark tables from ``bench/out/*.txt`` into the README, between its bench markers.

``make bench`` writes the outputs and then runs this, so the README always quotes the tables of the
latest full run, with the date and machine, and nobody retypes a figure by hand. Log lines (the
controller's ``[step N]`` lines and Ray's) are dropped; tables and their footnotes are kept.

Usage: python bench/to_readme.py [--readme README.md] [--out bench/out]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

# (file, heading, one line on what to read in it)
SECTIONS = (
    ("reshard", "Live reshard against a fair checkpoint-restart",
     "Each row's baseline is that same transition done the way users restart: DCP save, every process restarted at "
     "the new world size, DCP load. The floors are measured in the same run, with every pair of the transition "
     "sending at once."),
    ("peers", "The real peers: torchrun and Ray Train v2",
     "Same model, batch, machine and kill schedule, one subprocess each."),
    ("recovery", "Recovery from a SIGKILL", "MTTR includes the killed step itself; 'training again after' does not. "
     "The baseline restarts every process from a DCP checkpoint."),
    ("lora", "LoRA against full fine-tuning", "Rebuild time grows with the parameter count (FSDP/DTensor set-up)."),
    ("grpo_phases", "GRPO rollout/update phases",
     "Whether a phase relayout pays for itself, decided by the cost model."),
    ("rollout", "GRPO rollouts: each prompt prefilled once per group",
     "Against the repeat-G prefill in the same run, on the same batches; the completions are the same tokens."),
    ("throughput", "Step throughput per layout", "Two processes share 2 cores, so parallel layouts cannot beat one."),
    ("load", "Loading a user's model at size",
     "A 494M-parameter Qwen2 folder in bf16, to the first LoRA step, against transformers + PEFT in one process. "
     "transformers maps the file lazily, so its 'loaded' point comes before the weights are read."),
)
# Log lines (the controller's, Ray's, progress bars), the exit code, and per-run progress lines that the
# tables repeat ("  dp=4 -> dp=2,tp=2: live ..." and "  torchrun-kill: {...}").
NOISE = re.compile(r"^(\[step \d+\]|worker \d+ failed to start|.*\(raylet\)|.*it/s\]|\s*\d+%\||EXIT \d+$"
                   r"|\s+\S.* -> .*: live |\s+[a-z]+-[a-z]+: \{|writing .* once)")


def cleaned(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r", "\n").splitlines()]
    return "\n".join(line for line in lines if line and not NOISE.match(line)).strip()


def section(out: Path) -> str:
    machine = f"{os.cpu_count()}-core {platform.machine()} {platform.system()}, torch {torch.__version__}"
    parts = [f"Measured on a {machine}; outputs of {datetime.date.today().isoformat()} (`make bench` "
             "refreshes them). Every figure is from one run, against a baseline measured in that same run.\n"]
    for name, heading, note in SECTIONS:
        path = out / f"{name}.txt"
        if not path.exists():
            continue
        table = cleaned(path.read_text())
        parts.append(f"### {heading}\n\n{note} Source: `bench/{name}.py`.\n\n```text\n{table}\n```\n")
    parts.append("When a reward-noise correction helps GRPO (gradient, bandit and language-model experiments, "
                 "an hour: `make bench-noise`): the results and their verdicts are summarised in "
                 "[docs/grpo_noise.md](docs/grpo_noise.md).\n")
    parts.append("Planning at cluster scale (8B/70B/405B, up to 4,096 simulated workers): "
                 "[docs/scale.md](docs/scale.md), from `bench/plan_scale.py`.\n")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out")
    args = parser.parse_args()
    text = args.readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{args.readme} has no {START} ... {END} markers; add them where the tables go")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    args.readme.write_text(f"{head}{START}\n{section(args.out)}\n{END}{tail}")
    print(f"updated {args.readme} from {args.out}")


if __name__ == "__main__":
    main()
