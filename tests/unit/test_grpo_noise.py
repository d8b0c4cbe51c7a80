"""When a reward-noise correction can change GRPO training, and when it cannot (docs/grpo_noise.md).

The theory: with one constant Youden's J = 1 - rho_plus - rho_minus, dr_grpo's correction multiplies
every advantage, so every gradient, by 1/J. The clipped PPO objective is positively homogeneous in
the advantages, so that holds exactly. AdamW divides a constant gradient scale out (up to its eps);
plain SGD turns it into a learning rate of lr/J. These tests train a small model on one fixed bank of
completions and check both predictions, that per-group rates and a KL term break the equality, and
that the configuration warns about the no-op case. Per-group and forward-corrected advantages are
checked by hand.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

from elastic.core.config import MODEL_PRESETS
from elastic.model.llama import LlamaStage
from elastic.recipes.grpo.advantage import noise_corrected_advantages
from elastic.recipes.grpo.loop import GRPOLoop, NoOpCorrectionWarning
from elastic.recipes.grpo.loss import grpo_loss
from elastic.recipes.grpo.noise import FlipRates, RewardNoise
from elastic.recipes.grpo.rates import RowRates
from elastic.recipes.grpo.recipe import grpo_config

pytestmark = pytest.mark.timeout(60)
F64 = torch.float64
P, G, PROMPT, C = 6, 4, 4, 5
RATES = FlipRates(0.2, 0.1)  # J = 0.7


def bank():
    """A fixed rollout bank: P prompts x G completions of random tokens, clean 0/1 rewards, noisy ones."""
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 256, (P, PROMPT), generator=gen).repeat_interleave(G, dim=0)
    completions = torch.randint(0, 256, (P * G, C), generator=gen)
    clean = (torch.rand(P * G, generator=gen) < 0.5).to(F64)
    noisy = RewardNoise(RATES, seed=3).observe_groups(clean, list(range(P)), G)
    return torch.cat([prompts, completions], dim=1), noisy


def logps(model, ids):
    logits = model(ids)[:, PROMPT - 1 : -1]
    return torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, PROMPT:, None]).squeeze(-1)


def train(advantages, optimizer: str, lr: float, steps: int = 4, eps: float = 1e-8, beta: float = 0.0):
    """``steps`` optimizer steps on the bank (old log-probs fixed at the start, so the ratio clips)."""
    torch.manual_seed(0)
    model = LlamaStage(dataclasses.replace(MODEL_PRESETS["tiny"])).to(F64)
    ids, _ = bank()
    with torch.no_grad():
        old = logps(model, ids)
    ref = old + 0.05 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    opt = (torch.optim.AdamW(model.parameters(), lr=lr, eps=eps, weight_decay=0.0) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=lr))
    mask = torch.ones(P * G, C, dtype=torch.bool)
    for _ in range(steps):
        loss, _ = grpo_loss(logps(model, ids), advantages, mask, old_logps=old, ref_logps=ref if beta else None,
                            beta=beta, loss_type="dr_grpo")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_constant_rates_dr_grpo_is_a_no_op_under_adamw_and_an_lr_rescale_under_sgd():
    _, noisy = bank()
    plain = noise_corrected_advantages(noisy, G, RATES, "none", "none")
    corrected = noise_corrected_advantages(noisy, G, RATES, "dr_grpo", "none")
    assert torch.allclose(corrected, plain / RATES.scale, rtol=0, atol=1e-15)
    start = train(plain, "sgd", 0.0, steps=1)
    # AdamW: the same weights up to eps effects. The gap shrinks in proportion to eps (here 2.4e-5 of the
    # weights' norm at torch's default 1e-8, 7e-9 at 1e-12), so eps is its only cause.
    gaps = {eps: rel(train(corrected, "adamw", 1e-2, eps=eps), train(plain, "adamw", 1e-2, eps=eps))
            for eps in (1e-10, 1e-12)}
    moved = rel(train(plain, "adamw", 1e-2, eps=1e-12), start)
    assert gaps[1e-12] < 1e-6 * moved and 30 < gaps[1e-10] / gaps[1e-12] < 300, (gaps, moved)
    # SGD: corrected at lr is uncorrected at lr / J, to rounding; at the same lr they differ.
    sgd = train(corrected, "sgd", 0.05)
    assert rel(sgd, train(plain, "sgd", 0.05 / RATES.scale)) < 1e-12
    assert rel(sgd, train(plain, "sgd", 0.05)) > 0.05 * rel(sgd, start)


def test_per_group_rates_and_a_kl_term_change_training_under_adamw():
    _, noisy = bank()
    plain = noise_corrected_advantages(noisy, G, RATES, "none", "none")
    adamw = train(plain, "adamw", 1e-2)
    # Two rate groups (J = 0.9 on even prompts, 0.4 on odd ones): a relative re-weighting AdamW keeps.
    groups = RowRates(torch.tensor([0.05, 0.3] * (P // 2), dtype=F64), torch.tensor([0.05, 0.3] * (P // 2), dtype=F64))
    per_group = noise_corrected_advantages(noisy, G, groups, "dr_grpo", "none")
    assert rel(train(per_group, "adamw", 1e-2), adamw) > 1e-3
    # beta > 0: the correction scales the policy term against the KL term.
    corrected = noise_corrected_advantages(noisy, G, RATES, "dr_grpo", "none")
    assert rel(train(corrected, "adamw", 1e-2, beta=0.5), train(plain, "adamw", 1e-2, beta=0.5)) > 1e-3


def test_per_group_and_forward_advantages_by_hand():
    rewards = torch.tensor([1, 0, 0, 1, 1, 1, 1, 0], dtype=F64)  # group means 0.5 and 0.75
    groups = RowRates(torch.tensor([0.1, 0.0], dtype=F64), torch.tensor([0.2, 0.5], dtype=F64))  # J 0.7, 0.5
    got = noise_corrected_advantages(rewards, 4, groups, "dr_grpo", "none")
    want = [0.5 / 0.7, -0.5 / 0.7, -0.5 / 0.7, 0.5 / 0.7, 0.25 / 0.5, 0.25 / 0.5, 0.25 / 0.5, -0.75 / 0.5]
    assert torch.allclose(got, torch.tensor(want, dtype=F64), atol=1e-12)
    # forward, rho_minus = 0.5 in group 2: p = 0.75 / 0.5 -> 1 (clipped), q = 0.5 / 0.5 = 1: every observed 0
    # there is a missed 1, so the group carries no signal. Group 1: p = 0.5 / 0.8 = 0.625, q = 0.2 * 0.625 /
    # (0.125 + 0.375) = 0.25: rewards [1, 0.25, 0.25, 1], centred (mean 0.625) +-0.375, no std scaling.
    no_false_positives = RowRates(torch.zeros(2, dtype=F64), groups.rho_minus)  # forward assumes rho_plus = 0
    got = noise_corrected_advantages(rewards, 4, no_false_positives, "forward", "none")
    assert torch.allclose(got, torch.tensor([0.375, -0.375, -0.375, 0.375, 0, 0, 0, 0], dtype=F64), atol=1e-12)
    with pytest.raises(ValueError, match="scale_rewards='batch' estimates one clean std for the batch"):
        noise_corrected_advantages(rewards, 4, groups, "grpo", "batch")


def test_the_config_warns_once_when_the_correction_cannot_change_training():
    def loop(**grpo):
        return GRPOLoop(grpo_config(workers=1, **grpo))

    with pytest.warns(NoOpCorrectionWarning, match=r"J = 0.700\), beta = 0 and AdamW multiplies every gradient by "
                                                   r"1/J = 1.429, which AdamW's normalisation removes"):
        loop(correction="dr_grpo", scale_rewards="none", rho_plus=0.2, rho_minus=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoOpCorrectionWarning)
        loop(correction="dr_grpo", scale_rewards="none", task="mixed", rate_group="task",
             group_rates="arithmetic=0.05:0.05,sort_digits=0.3:0.3")
        loop(correction="grpo", rho_plus=0.2, rho_minus=0.1)  # re-weights groups: not a no-op
    # Rates of a group no prompt has (or a default every prompt's group overrides) do not re-weight anything:
    # the warning reads the rates the prompts use (both tasks at 0.3:0.3 here, the default rho 0 unused).
    with pytest.warns(NoOpCorrectionWarning, match=r"J = 0.400\)"):
        loop(correction="dr_grpo", scale_rewards="none", task="mixed", rate_group="task",
             group_rates="arithmetic=0.3:0.3,sort_digits=0.3:0.3,unused=0.05:0.05")
    with pytest.raises(ValueError, match="grpo.correction='dr_grpo' needs flip rates, and the config gives none"):
        loop(correction="dr_grpo", scale_rewards="none")
    with pytest.raises(ValueError, match="grpo.correction='forward' needs the false-negative rate rho_minus"):
        loop(correction="forward", rho_plus=0.2)
    with pytest.raises(ValueError, match="grpo.correction='forward' assumes rho_plus = 0"):
        loop(correction="forward", rho_plus=0.2, rho_minus=0.1)
    with pytest.raises(ValueError, match="grpo.rate_group='kind' is not a column of the built-in task 'mixed'"):
        loop(task="mixed", rate_group="kind")


def test_rates_of_a_real_verifier_per_task_from_a_calibration_set(tmp_path, caplog):
    """inject_noise=False: gold labels from the dataset's answer, observed ones from the user's verifier."""
    import json
    import logging

    lenient = dict(task="mixed", rate_group="task", inject_noise=False, estimate_rates=True, correction="dr_grpo",
                   scale_rewards="none", reward_funcs="elastic.recipes.grpo.rewards:lenient_accuracy")
    with caplog.at_level(logging.INFO, logger="elastic"):
        loop = GRPOLoop(grpo_config(workers=1, calibration_size=800, **lenient))
    by_group = {e.group: e for e in loop.estimates}
    assert set(by_group) == {"arithmetic", "sort_digits"}
    for e in by_group.values():  # near misses are half the negatives; nothing correct is rejected
        assert 0.3 < e.rates.rho_plus < 0.7 and e.rates.rho_minus == 0.0, e.line()
    assert "rho+" in caplog.text and "95% Wilson intervals" in caplog.text
    strict = {**lenient, "reward_funcs": "elastic.recipes.grpo.rewards:strict_accuracy"}
    for e in GRPOLoop(grpo_config(workers=1, calibration_size=800, **strict)).estimates:
        assert e.rates.rho_plus == 0.0 and 0.3 < e.rates.rho_minus < 0.7, e.line()
    # A gold-labelled file of the policy's own outputs; one group has too few positives.
    path = tmp_path / "calibration.jsonl"
    rows = [{"prompt": "1+1=", "completion": "2" if i % 2 else "3", "label": i % 2, "answer": "2", "task": "arithmetic"}
            for i in range(60)] + [{"prompt": "sort 21=", "completion": "12", "label": 1, "answer": "12",
                                    "task": "sort_digits"}] * 3
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match="rate group 'sort_digits' has 0 calibration samples with gold label 0, "
                                         "fewer than the 20 needed to estimate rho_plus"):
        GRPOLoop(grpo_config(workers=1, calibration=str(path), **strict))
