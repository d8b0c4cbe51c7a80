"""Evaluation during training (``train.eval_every``) on real workers: an ``eval_loss`` every K steps in
``metrics.jsonl``, equal to one plain-torch forward of every held-out row through the single-process reference's
weights at that step (float64, 1e-9), under fsdp x tp and then under a pipeline; and training untouched: the same
final weights as the reference run (which never evaluates), and every training sample used exactly once.

GRPO's ``eval_reward``: greedy completions of held-out prompts on data-parallel ranks, put off while the train
phase's fsdp layout cannot sample, equal to the reference policy's greedy completions scored alike."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from elastic.control.controller import Controller
from elastic.control.events import Relayout
from elastic.control.run import with_control
from elastic.control.sources import ScriptedEvents
from elastic.core.data import build_dataset
from elastic.core.layout import Layout
from elastic.core.tokenizer import ByteTokenizer
from elastic.recipes.grpo.config import GRPOConfig
from elastic.recipes.grpo.workload import GRPOWorkload
from elastic.tools.metrics import read_run
from tests import helpers
from tests.helpers import digit_reward, tiny_config, worst_state_err
from tests.reference import build_model, cached_reference, reference_sample, train_grpo_reference

STEPS, EVERY, HELD_OUT = 4, 2, 33  # 33 rows: uneven shares, so one slice pads its last forward
FIRST, THEN = "fsdp=2,tp=2", "dp=2,pp=2,mb=2"


def reference_eval_loss(cfg, steps: int) -> float:
    """Mean token NLL over every held-out row, one plain forward of the reference's weights after ``steps``."""
    model = build_model(cfg)
    model.load_state_dict({k: v for k, v in cached_reference(cfg, steps=steps).tensors.items() if "::" not in k})
    ds = build_dataset(cfg.data, cfg.train.seed)
    x, y = ds.batch(range(ds.holdout_size()), "holdout")
    with torch.no_grad():
        logits = model(x)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100, reduction="sum")
    return float(total / (y != -100).sum())


@pytest.mark.timeout(300)
def test_eval_loss_every_k_steps_equals_single_process_and_leaves_training_alone(pool, tmp_path):
    cfg = tiny_config(steps=STEPS)
    windows = len(build_dataset(dataclasses.replace(cfg.data, eval_fraction=0.0), cfg.train.seed))
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, eval_fraction=(HELD_OUT + 0.5) / windows),
                      train=dataclasses.replace(cfg.train, eval_every=EVERY))
    assert build_dataset(cfg.data, cfg.train.seed).holdout_size() == HELD_OUT
    # The evaluation after step 2 runs on FIRST; the relayout comes between steps 2 and 3, so the one after step 4
    # runs on THEN (hidden states sent stage to stage).
    script = ScriptedEvents({2: [Relayout(reason="test", layout=Layout.parse(THEN))]})
    cfg = with_control(cfg, layout=FIRST, prepare_wait_steps=0)
    controller = Controller(cfg, group=pool, sources=[script], progress=False, run_dir=str(tmp_path / "run"))
    try:
        result = controller.run()
    finally:
        controller.shutdown()
    assert [h.layout for h in result.history] == [str(Layout.parse(FIRST))] * 2 + [str(Layout.parse(THEN))] * 2
    steps, _ = read_run(tmp_path / "run")
    evals = {s["step"]: s["eval_loss"] for s in steps if "eval_loss" in s}
    assert sorted(evals) == [EVERY - 1, 2 * EVERY - 1]  # after 2 and 4 committed steps (0-based rows 1 and 3)
    assert all(s["eval_samples"] == HELD_OUT for s in steps if "eval_loss" in s)
    for step, got in evals.items():
        want = reference_eval_loss(cfg, step + 1)
        assert abs(got - want) / want <= 1e-9, f"step {step}: {got} vs {want}"
    assert evals[1] != evals[3]  # the weights moved between the two evaluations
    # Training is the reference's, which never evaluates, and every sample was trained on once.
    err, name = worst_state_err(result.tensors, cached_reference(cfg).tensors)
    assert err <= 1e-9, f"{name}: {err:.2e}"
    helpers.assert_exactly_once(result.history, STEPS, cfg.train.global_batch,
                                len(build_dataset(cfg.data, cfg.train.seed)))


def reference_eval_reward(cfg, steps: int, prompts: list[str]) -> float:
    """Mean ``digit_reward`` of the reference policy's greedy completion of each prompt after ``steps``."""
    model = build_model(cfg)
    model.load_state_dict({k: v for k, v in train_grpo_reference(cfg, digit_reward, steps=steps).tensors.items()
                           if "::" not in k})
    tok, g = ByteTokenizer(), GRPOConfig.of(cfg)
    with torch.no_grad():
        completions = [tok.decode(reference_sample(model, tok.encode(p, bos=True), g.max_new_tokens, 0.0, 1.0,
                                                   (tok.eos_id,), torch.Generator())) for p in prompts]
    return sum(digit_reward(p, c) for p, c in zip(prompts, completions, strict=True)) / len(prompts)


@pytest.mark.timeout(300)
def test_grpo_eval_reward_waits_for_a_data_parallel_layout_and_equals_single_process(pool, tmp_path):
    prompts = [f"{10 + 7 * i}+{31 + 5 * i}=" for i in range(7)]  # 7: uneven shares over two ranks
    held = tmp_path / "eval_prompts.jsonl"
    held.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts))
    cfg = tiny_config(steps=3, dtype="float64", dataset="arithmetic", seq_len=12, global_batch=4)
    cfg = cfg.replace(grpo=GRPOConfig(num_generations=4, max_new_tokens=4, loss_type="grpo", inject_noise=False,
                                      reward_fn="tests.helpers:digit_reward", eval_prompts=str(held)),
                      train=dataclasses.replace(cfg.train, eval_every=1))
    # Updates on fsdp=2, where greedy sampling cannot run: each evaluation waits for the next rollout's dp=2.
    cfg = with_control(cfg, layout="dp=2", phase_layouts={"rollout": Layout(dp=2), "train": Layout(fsdp=2)})
    controller = Controller(cfg, group=pool, workload=GRPOWorkload(cfg), progress=False,
                            run_dir=str(tmp_path / "run"))
    try:
        result = controller.run()
    finally:
        controller.shutdown()
    assert {h.layout for h in result.history} == {"fsdp=2"}
    evals = {s["step"]: s for s in read_run(tmp_path / "run")[0] if "eval_reward" in s}
    # After steps 1 and 2 on the next rollout's layout; after the last step no rollout comes, so none.
    assert sorted(evals) == [0, 1], sorted(evals)
    for step, row in evals.items():
        assert row["eval_samples"] == len(prompts) and row["eval_completions/max_length"] <= 4
        want = reference_eval_reward(cfg, step + 1, prompts)
        assert abs(row["eval_reward"] - want) <= 1e-12, f"step {step}: {row['eval_reward']} vs {want}"
    err, name = worst_state_err(result.tensors, train_grpo_reference(cfg, digit_reward).tensors)
    assert err <= 1e-9, f"{name}: {err:.2e}"
