"""GRPO under live reconfiguration equals the single-process GRPO run (float64).

Rollouts run on data-parallel layouts and updates on fsdp (phase relayouts at every boundary),
while a worker is drained and another added. Sampling is seeded per global prompt index, so the
completions do not depend on which worker draws them.
"""

from __future__ import annotations

import pytest

from elastic.control.controller import Controller, ControllerOptions
from elastic.control.events import AddWorkers, Drain
from elastic.control.sources import ScriptedEvents
from elastic.core.layout import Layout
from elastic.recipes.grpo.config import GRPOConfig
from elastic.recipes.grpo.workload import GRPOWorkload
from tests.helpers import WaitForWorkers, digit_reward, tiny_config, worst_state_err
from tests.reference import train_grpo_reference


def grpo_cfg():
    cfg = tiny_config(steps=6, dtype="float64", dataset="arithmetic", seq_len=12, global_batch=6)
    return cfg.replace(grpo=GRPOConfig(num_generations=4, max_new_tokens=4, num_iterations=2, loss_type="grpo",
                                       reward_fn="tests.helpers:digit_reward", inject_noise=False))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_grpo_with_drain_add_and_phase_relayouts_equals_single_process(fresh_pool):
    cfg = grpo_cfg()
    reference = train_grpo_reference(cfg, digit_reward)
    ref = reference.tensors
    assert any(abs(loss) > 1e-6 for loss in reference.losses)  # the policy gradient is not trivially zero
    script = ScriptedEvents({2: [Drain(reason="preempted", worker=fresh_pool.alive()[1])],
                             4: [AddWorkers(reason="back", count=1)]})
    group = fresh_pool
    options = ControllerOptions(objective="use_all", sources=[script, WaitForWorkers(group)], progress=False,
                                phase_layouts={"train": Layout(fsdp=2)})
    workload = GRPOWorkload(cfg)
    controller = Controller(cfg, options, group=group, workload=workload)
    try:
        result = controller.run()
    finally:
        controller.shutdown()
    relayouts = [r for r in result.reshards if r.reason.endswith("phase")]
    assert len(relayouts) >= 3, [r.line() for r in result.reshards]  # into the train layout at every GRPO step
    assert {h.layout for h in result.history} == {"fsdp=2"}
    assert any(e["kind"] == "drained" for e in result.events)
    err, name = worst_state_err(result.tensors, ref)
    assert err <= 1e-9, f"{name}: {err:.2e}"
    # The ledger, from the ranks: every iteration of GRPO step k trains each completion of k's 6 prompts once
    # (index prompt * G + sample), and no prompt comes back in a later GRPO step (one epoch of 2000).
    G, mu = 4, 2
    prompts_seen = []
    for k in range(3):
        for h in result.history[k * mu:(k + 1) * mu]:
            prompts = sorted({c // G for c in h.samples})
            assert len(prompts) == 6 and sorted(h.samples) == [p * G + g for p in prompts for g in range(G)]
        prompts_seen += prompts
    assert len(set(prompts_seen)) == 18 and [sorted(s) for s in reference.samples] == [
        sorted(prompts_seen[i * 6:(i + 1) * 6]) for i in range(3)]
    assert workload.seconds["rollout"] > 0 and workload.seconds["train"] > 0
