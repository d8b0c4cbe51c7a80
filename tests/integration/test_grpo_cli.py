"""GRPO from the command line to a policy a user can load and sample: ``elastic train --recipe grpo`` with
LoRA on a random Qwen2 folder and a prompt file, as a process (its own local Ray). The run leaves a PEFT
adapter that ``AutoPeftModelForCausalLM`` loads by itself (the adapter names its base), a metrics.jsonl
whose every row has what TRL's GRPOTrainer logs, finite, and prints the ``elastic generate`` command,
which then samples from the adapter for the prompt file; ``elastic export`` turns the run's checkpoint into
the same adapter.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch

from elastic.tools.tiny_hf import write_model, write_tokenizer
from launch.cli import main

ROOT = Path(__file__).resolve().parents[2]
TRL_METRICS = ("reward", "reward_std", "rewards/trl_style_reward/mean", "rewards/trl_style_reward/std",
               "completions/mean_length", "completions/min_length", "completions/max_length",
               "completions/clipped_ratio", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean",
               "clip_ratio/region_mean", "entropy", "learning_rate")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_grpo_cli_saves_an_adapter_peft_loads_and_logs_trls_metrics(tmp_path):
    base = tmp_path / "base"
    write_model(base, "qwen2")
    write_tokenizer(base)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+{2 * i}=", "answer": str(3 * i)}) + "\n"
                               for i in range(8)))
    run_dir = tmp_path / "run"
    # Most of the run's choices in TRL's own YAML (GRPOConfig's and ModelConfig's names), the rest as flags.
    trl_yaml = tmp_path / "grpo.yaml"
    trl_yaml.write_text("reward_funcs: tests.helpers:trl_style_reward\nmax_steps: 2\nnum_generations: 2\n"
                        "max_completion_length: 4\nbeta: 0.04\nlora_r: 4\nreport_to: none\nlogging_steps: 1\n")
    out = subprocess.run([sys.executable, "-m", "launch", "train", "--recipe", "grpo", "--base", str(base),
                          "--data", str(prompts), "--config", str(trl_yaml), "--workers", "1",
                          "--train.global_batch", "2", "--run-dir", str(run_dir), "--no-progress"],
                         cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "report_to" in out.stdout and "logging_steps" in out.stdout  # accepted, and listed as changing nothing
    recorded = (run_dir / "config.toml").read_text()
    for line in ("steps = 2", "num_generations = 2", "max_new_tokens = 4", "beta = 0.04", "r = 4",
                 'reward_funcs = "tests.helpers:trl_style_reward"'):
        assert line in recorded, (line, recorded)
    adapter = run_dir / "adapter"
    assert f"elastic generate --base {base} --adapter {adapter}" in out.stdout, out.stdout[-2000:]

    model = peft.AutoPeftModelForCausalLM.from_pretrained(str(adapter))  # finds its base from the adapter alone
    assert isinstance(model, peft.PeftModel)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    for row in rows:
        missing = [name for name in TRL_METRICS if not isinstance(row.get(name), float) or not math.isfinite(row[name])]
        assert not missing, (missing, row)
        assert 1 <= row["completions/min_length"] <= row["completions/mean_length"] <= 4

    # Any checkpoint of the run gives the policy too (here the final one, written at the end): the same adapter.
    from safetensors.torch import load_file

    assert main(["export", str(run_dir), "--out", str(tmp_path / "exported")]) == 0
    exported = tmp_path / "exported" / "adapter"
    ours, theirs = (load_file(str(d / "adapter_model.safetensors")) for d in (exported, adapter))
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)

    completions = tmp_path / "out.jsonl"
    assert main(["generate", "--base", str(base), "--adapter", str(adapter), "--prompts", str(prompts),
                 "--max_new_tokens", "4", "--out", str(completions)]) == 0
    assert len(completions.read_text().splitlines()) == 8
