"""GRPO on users' prompts: a Qwen2 folder with its own tokenizer and chat template, a JSONL of prompts
of different lengths (texts and conversations, with an ``answer`` column), and two TRL-style reward
functions, and TRL's top_entropy_quantile. Rollouts run left-padded on data-parallel layouts, updates on
dp=2 x tp=2 until a worker is drained, then on dp=3 (the three left, ``objective=use_all``):
the weights equal the single-process reference, which samples and scores every prompt group alone at
its own length, never padded (float64, 1e-9); so do the metrics TRL logs (rewards per function,
completion lengths, entropy, clip ratios), each a global mean of the shards' sums.
"""

from __future__ import annotations

import json

import pytest

from elastic.control.controller import Controller
from elastic.control.events import Drain
from elastic.control.run import with_control
from elastic.control.sources import ScriptedEvents
from elastic.core.config import RuntimeConfig
from elastic.core.layout import Layout
from elastic.recipes.grpo.recipe import grpo_config
from elastic.recipes.grpo.workload import GRPOWorkload
from elastic.tools.tiny_hf import write_tokenizer
from tests.helpers import worst_state_err
from tests.reference import train_grpo_reference
from tests.unit.test_families import write_folder


def write_prompts(path, n: int = 24):
    with path.open("w") as fh:
        for i in range(n):
            a, b = 3 + i, 7 * i % 50
            prompt = (f"{a}+{b}=" if i % 3 == 0 else f"What is {a} plus {b}? Answer with digits only: " * (1 + i % 2)
                      if i % 3 == 1 else [{"role": "user", "content": f"Add {a} and {b}."}])
            fh.write(json.dumps({"prompt": prompt, "answer": str(a + b)}) + "\n")
    return path


@pytest.mark.timeout(300)
def test_grpo_on_a_prompt_file_with_reward_funcs_equals_single_process(fresh_pool, tmp_path):
    base, _ = write_folder(tmp_path / "qwen2", "qwen2-tied", vocab_size=448)
    write_tokenizer(base)
    cfg = grpo_config(base, steps=2, workers=4, prompts_per_step=4, lora=False, dtype="float64", num_iterations=2,
                      data=str(write_prompts(tmp_path / "prompts.jsonl")), num_generations=3, max_new_tokens=5,
                      loss_type="grpo", reward_funcs="tests.helpers:trl_style_reward,tests.helpers:trl_style_bonus",
                      top_entropy_quantile=0.6)  # its quantile must come from the whole batch, across ranks
    cfg = cfg.replace(runtime=RuntimeConfig(workers=4, collective_timeout_s=60))
    reference = train_grpo_reference(cfg, None)
    assert any(abs(loss) > 1e-6 for loss in reference.losses)  # iteration 2 reuses the batch: ratios move
    workload = GRPOWorkload(cfg)
    widths = {len(workload.loop.task.ids(i)) for i in range(len(workload.loop.task))}
    assert len(widths) > 3  # prompts of many lengths share each batch, left-padded to one width
    script = ScriptedEvents({2: [Drain(reason="preempted", worker=fresh_pool.warm()[2])]})
    cfg = with_control(cfg, objective="use_all", phase_layouts={"train": Layout(dp=2, tp=2)}, prepare_wait_steps=0)
    controller = Controller(cfg, group=fresh_pool, workload=workload, sources=[script], progress=False)
    try:
        result = controller.run()
    finally:
        controller.shutdown()
    layouts = [h.layout for h in result.history]
    # The operator's dp=2 x tp=2 until the drain; then the three workers left all train (use_all) as dp=3. Two
    # and then three data shards: the entropy quantile is gathered across both.
    assert layouts == ["dp=2,tp=2"] * 2 + ["dp=3"] * 2, layouts
    assert any(e["kind"] == "drained" for e in result.events)
    err, name = worst_state_err(result.tensors, reference.tensors)
    assert err <= 1e-9, f"{name}: {err:.2e}"
    # What TRL logs, from sums and counts over the data shards of two layouts: the single process's values.
    for h in result.history:
        theirs = reference.metrics[h.step]
        assert set(h.metrics) == set(theirs), sorted(set(h.metrics) ^ set(theirs))
        for key, value in theirs.items():
            assert h.metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), (h.step, key)
    assert any(h.metrics["clip_ratio/region_mean"] > 0 for h in result.history)  # iteration 2's ratios move
    assert 0 < result.history[0].metrics["completions/mean_length"] <= 5
