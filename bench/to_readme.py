"""Copy the benchmark tables from ``bench/out/*.txt`` into the README, between its bench markers.

``make bench`` (and the other bench targets) write the outputs and then run this, so the README quotes
each bench's latest output, stamped with its date and commit, and nobody retypes a figure by hand; a
section whose output is not in ``bench/out`` keeps its text. A plot beside an output (``NAME.png``) is
copied to ``docs/`` and shown. Log lines (the
controller's ``[step N]`` lines and Ray's) are dropped; tables and their footnotes are kept.

Usage: python bench/to_readme.py [--readme README.md] [--out bench/out]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

# (file, heading, one line on what to read in it)
SECTIONS = (
    ("goodput", "Goodput under a preemption trace: this project, Ray Train v2 and torchrun",
     "One seeded trace of preemptions (30 s notice, sent through Ray's own drain API), node failures and returning "
     "capacity, played against each system at the same offsets from its first step, on the same nodes."),
    ("reshard", "Live reshard against a fair checkpoint-restart",
     "Each row's baseline is that same transition done the way users restart: DCP save, every process restarted at "
     "the new world size, DCP load. The floors are measured in the same run, with every pair of the transition "
     "sending at once."),
    ("peers", "The real peers: torchrun and Ray Train v2",
     "Same model, batch, machine and kill schedule, one subprocess each."),
    ("failures", "Failures as clusters produce them",
     "A worker SIGKILLed, a worker hung (SIGSTOP), the driver lost, a node lost, on a two-node cluster with the "
     "default safety (no replica: auto snapshots held off-node, checkpoints in the run folder)."),
    ("recovery", "Recovery from a SIGKILL", "MTTR includes the killed step itself; 'training again after' does not. "
     "The baseline restarts every process from a DCP checkpoint."),
    ("lora", "LoRA against full fine-tuning", "Rebuild time grows with the parameter count (FSDP/DTensor set-up)."),
    ("grpo_phases", "GRPO rollout/update phases",
     "Whether a phase relayout pays for itself, decided by the cost model."),
    ("rollout", "GRPO rollouts: each prompt prefilled once per group",
     "Against the repeat-G prefill in the same run, on the same batches; the completions are the same tokens."),
    ("throughput", "Step throughput per layout", "Two processes share 2 cores, so parallel layouts cannot beat one."),
    ("load", "Training a user's model at size",
     "A Qwen2 folder at Qwen2.5-0.5B's width (494M parameters at 24 layers; the output's title gives the layers), "
     "LoRA r=16 and full fine-tuning in mixed precision on fsdp=4: load, steps and the workers' export, against "
     "torchrun with plain FSDP2 on four processes and transformers (+ PEFT) in one process, same folder and batch."),
)
# Log lines (the controller's, Ray's, progress bars), the exit code, and per-run progress lines that the
# tables repeat ("  dp=4 -> dp=2,tp=2: live ..." and "  torchrun-kill: {...}").
NOISE = re.compile(r"^(\[step \d+\]|worker \d+ failed to start|.*\(raylet\)|.*it/s\]|\s*\d+%\||EXIT \d+$"
                   r"|\s+\S.* -> .*: live |\s+[a-z]+-[a-z]+: \{|writing .* once)")


def cleaned(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r", "\n").splitlines()]
    return "\n".join(line for line in lines if line and not NOISE.match(line)).strip()


def stamp(path: Path) -> str:
    """When a bench output was written (its file time), and the commit it was copied at (the checkout's now:
    the output itself does not say which commit produced it)."""
    when = datetime.date.fromtimestamp(path.stat().st_mtime).isoformat()
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return (f"Measured {when}; copied here at commit {commit or 'unknown'}"
            f"{' with uncommitted changes' if dirty else ''}.")


def previous(block: str) -> dict[str, str]:
    """The README's current sections by heading, each stamped (an unstamped one with the old common date)."""
    dated = re.search(r"outputs of (\d{4}-\d{2}-\d{2})", block)
    sections = {}
    for part in re.split(r"^### ", block, flags=re.M)[1:]:
        heading, _, body = part.partition("\n")
        body = body.strip()
        if "```" in body:  # a section ends with its table; what follows is the block's trailer, written anew
            body = body[: body.rindex("```") + 3]
        if not body.startswith("Measured ") and dated:
            body = f"Measured {dated.group(1)} or earlier (before each section carried its own date).\n\n{body}"
        sections[heading.strip()] = f"### {heading.strip()}\n\n{body}\n"
    return sections


def section(out: Path, old: str = "") -> str:
    """The bench block: a section per output in ``out``; a section with no output there keeps its old text."""
    machine = f"{os.cpu_count()}-core {platform.machine()} {platform.system()}, torch {version('torch')}"
    parts = [f"Measured on a {machine}. Every figure is from one run, against a baseline measured in that same "
             "run; each section says when and at which commit (`make bench` refreshes them).\n"]
    kept = previous(old)
    for name, heading, note in SECTIONS:
        path = out / f"{name}.txt"
        if not path.exists():
            if heading in kept:
                parts.append(kept[heading])
            continue
        table = cleaned(path.read_text())
        plot = ""
        if (out / f"{name}.png").exists():  # the README shows it from docs/, which is checked in
            shutil.copy(out / f"{name}.png", ROOT / "docs" / f"{name}.png")
            plot = f"![{heading}](docs/{name}.png)\n\n"
        parts.append(f"### {heading}\n\n{stamp(path)} {note} Source: `bench/{name}.py`.\n\n{plot}```text\n"
                     f"{table}\n```\n")
    parts.append("When a reward-noise correction helps GRPO (a shared-parameter bandit with every arm at its best "
                 "learning rate, about 8 minutes, and gradient and language-model studies on request: "
                 "`make bench-noise`): the tables and the verdict are in [docs/grpo_noise.md](docs/grpo_noise.md).\n")
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
    old, tail = rest.split(END, 1)
    args.readme.write_text(f"{head}{START}\n{section(args.out, old)}\n{END}{tail}")
    print(f"updated {args.readme} from {args.out}")


if __name__ == "__main__":
    main()
