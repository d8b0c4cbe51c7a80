"""TRL 1.x's GRPO knobs against TRL's own ``GRPOTrainer._compute_loss``, on fixed tensors.

TRL's method runs unmodified on a stand-in ``self`` that holds the config values it reads and
hands it our fixed per-token log-probs (one process, no gradient accumulation). Ours must give the
same loss and the same gradient, and its shards' losses must still sum to the whole batch's.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer import grpo_trainer as trl_grpo

from elastic.recipes.grpo.config import GRPOConfig
from elastic.recipes.grpo.loop import GRPOLoop
from elastic.recipes.grpo.loss import GlobalBatch, PolicyKnobs, grpo_loss_terms, high_entropy_mask
from elastic.recipes.grpo.prompts import parse_weights, score_batch
from elastic.recipes.grpo.recipe import grpo_config
from tests.unit.test_grpo_math import random_batch

F64 = torch.float64
MAX_LEN = 6


class _Accelerator:
    """One process: gathering and reducing return their input."""

    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def trl_loss(knobs: PolicyKnobs, loss_type: str, logps, old, ref, adv, mask, num_items=None, entropies=None,
             top_entropy_quantile=1.0, metrics=None):
    """TRL's ``_compute_loss`` on these tensors (its own code, a stand-in trainer); ``metrics``: a dict that
    receives what TRL logs (name -> list of values)."""
    entropies = torch.zeros_like(logps) if entropies is None else entropies
    args = SimpleNamespace(delta=knobs.delta, use_bias_correction_kl=False, steps_per_generation=1,
                           sapo_temperature_pos=knobs.sapo_temperature_pos,
                           sapo_temperature_neg=knobs.sapo_temperature_neg)
    trainer = SimpleNamespace(
        args=args, beta=knobs.beta, loss_type=loss_type, epsilon_low=knobs.epsilon, epsilon_high=knobs.high,
        importance_sampling_level=knobs.importance_sampling_level, top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=None, use_vllm=False, vllm_importance_sampling_correction=False,
        aux_loss_enabled=False, _entropy_bonus_enabled=False, max_completion_length=MAX_LEN,
        current_gradient_accumulation_steps=1, model=SimpleNamespace(training=True), accelerator=_Accelerator(),
        _metrics={"train": defaultdict(list) if metrics is None else metrics},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropies, None))
    trainer.get_high_entropy_mask = lambda *a: trl_grpo.GRPOTrainer.get_high_entropy_mask(trainer, *a)
    inputs = {"prompt_ids": torch.zeros(logps.shape[0], 2, dtype=torch.long),
              "prompt_mask": torch.ones(logps.shape[0], 2, dtype=torch.long),
              "completion_ids": torch.zeros_like(logps, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum() if num_items is None else torch.tensor(float(num_items))}
    return trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)


def batch():
    """Six completions, one of them empty and one that fills max_completion_length (truncated)."""
    return random_batch(width=MAX_LEN, lengths=(6, 1, 3, 0, 4, 2))


CASES = {
    "gspo (sequence-level ratio)": ("grpo", PolicyKnobs(importance_sampling_level="sequence")),
    "gspo + dapo + kl": ("dapo", PolicyKnobs(importance_sampling_level="sequence", beta=0.05)),
    "two-sided clip (delta)": ("dapo", PolicyKnobs(delta=1.3, epsilon_high=0.28)),
    "delta + bnpo + kl": ("bnpo", PolicyKnobs(delta=1.1, beta=0.04)),
    "cispo": ("cispo", PolicyKnobs(epsilon_high=1.2)),
    "cispo, sequence level": ("cispo", PolicyKnobs(epsilon_high=1.1, importance_sampling_level="sequence")),
    "sapo": ("sapo", PolicyKnobs()),
    "sapo + kl + other temperatures": ("sapo", PolicyKnobs(beta=0.1, sapo_temperature_pos=2.0,
                                                           sapo_temperature_neg=0.5)),
    "dr_grpo with delta": ("dr_grpo", PolicyKnobs(delta=1.2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_knob_equals_trl_and_stays_split_invariant(case):
    loss_type, knobs = CASES[case]
    logps, old, ref, adv, mask = batch()
    theirs = trl_loss(knobs, loss_type, logps, old, ref, adv, mask)
    (their_grad,) = torch.autograd.grad(theirs, logps)
    whole = GlobalBatch.of(mask, MAX_LEN)
    ours = grpo_loss_terms(logps, adv, mask, old_logps=old, ref_logps=ref, loss_type=loss_type, knobs=knobs)
    torch.testing.assert_close(ours.loss(whole), theirs, atol=1e-12, rtol=0)
    (our_grad,) = torch.autograd.grad(ours.loss(whole), logps)
    torch.testing.assert_close(our_grad, their_grad, atol=1e-12, rtol=0)
    # Three data-parallel shards, each over the global normaliser, sum to the whole.
    parts = [slice(0, 1), slice(1, 4), slice(4, 6)]
    shards = [grpo_loss_terms(logps[s], adv[s], mask[s], old_logps=old[s], ref_logps=ref[s], loss_type=loss_type,
                              knobs=knobs).loss(whole) for s in parts]
    torch.testing.assert_close(sum(shards), theirs, atol=1e-12, rtol=0)


# What TRL's _compute_loss logs that we report too (it also logs per-sequence clip extremes we do not).
TRL_STEP_METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                    "cispo_clip_ratio")


@pytest.mark.parametrize("case", list(CASES))
def test_step_metrics_equal_trls_and_add_up_over_shards(case):
    """kl, entropy and the clip ratios: TRL's names and values, and the shards' (sum, count) pairs add to them."""
    loss_type, knobs = CASES[case]
    logps, old, ref, adv, mask = batch()
    entropies = torch.rand(logps.shape, generator=torch.Generator().manual_seed(3), dtype=F64) * 2
    logged = defaultdict(list)
    trl_loss(knobs, loss_type, logps, old, ref, adv, mask, entropies=entropies, metrics=logged)
    theirs = {k: v[0] for k, v in logged.items() if k in TRL_STEP_METRICS}
    ref = ref if knobs.beta else None  # TRL computes the KL only with beta > 0, as our rollouts do
    parts = [slice(0, 1), slice(1, 4), slice(4, 6)]
    shards = [grpo_loss_terms(logps[s], adv[s], mask[s], old_logps=old[s], ref_logps=None if ref is None else ref[s],
                              loss_type=loss_type, knobs=knobs, entropies=entropies[s]) for s in parts]
    summed = {}
    for shard in shards:
        for name, (total, count) in shard.sums().items():
            a, b = summed.get(name, (0.0, 0.0))
            summed[name] = (a + total, b + count)
    ours = {name: total / max(count, 1.0) for name, (total, count) in summed.items()}
    assert ours == pytest.approx(theirs, rel=1e-7, abs=1e-12) and set(ours) == set(theirs)  # TRL counts in float32
    assert "entropy" in ours and ("clip_ratio/region_mean" in ours) == (loss_type not in ("cispo", "sapo"))


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.9])
def test_top_entropy_quantile_equals_trl_with_the_global_batchs_quantile(quantile):
    logps, old, ref, adv, mask = batch()
    entropies = torch.rand(logps.shape, generator=torch.Generator().manual_seed(7), dtype=F64) * 3
    knobs = PolicyKnobs(beta=0.05)
    theirs = trl_loss(knobs, "dapo", logps, old, ref, adv, mask, entropies=entropies, top_entropy_quantile=quantile)
    everyone = entropies[mask.bool()]  # what every rank gathers: the whole batch's completion tokens
    whole = GlobalBatch.of(mask, MAX_LEN)
    parts = [slice(0, 1), slice(1, 4), slice(4, 6)]
    shards = [grpo_loss_terms(logps[s], adv[s], mask[s], old_logps=old[s], ref_logps=ref[s], loss_type="dapo",
                              knobs=knobs, entropy_mask=high_entropy_mask(entropies[s], mask[s], quantile, everyone))
              for s in parts]
    torch.testing.assert_close(sum(t.loss(whole) for t in shards), theirs, atol=1e-12, rtol=0)
    kept = high_entropy_mask(entropies, mask, quantile, everyone)
    assert 0 < int(kept.sum()) < int(mask.sum())  # the mask bites


def test_mask_truncated_completions_uses_trls_count_after_masking():
    """TRL 1.x zeroes truncated completions' masks, then counts num_items_in_batch from the masked mask."""
    logps, old, ref, adv, mask = batch()
    truncated = mask.sum(-1) == MAX_LEN  # no EOS within max_completion_length
    assert truncated.any()
    masked = mask * (~truncated).unsqueeze(1)
    knobs = PolicyKnobs()
    theirs = trl_loss(knobs, "dapo", logps, old, ref, adv, masked, num_items=int(masked.sum()))
    ours = grpo_loss_terms(logps, adv, masked, old_logps=old, ref_logps=ref, loss_type="dapo", knobs=knobs)
    torch.testing.assert_close(ours.loss(GlobalBatch.of(masked, MAX_LEN)), theirs, atol=1e-12, rtol=0)


@pytest.mark.parametrize("given,expected", [(True, "group"), (False, "none"), ("batch", "batch"),
                                            ("true", "group"), ("False", "none")])
def test_scale_rewards_accepts_trls_boolean_aliases(given, expected):
    assert GRPOConfig(scale_rewards=given).scale_rewards == expected


def test_bad_knobs_are_one_clear_error():
    with pytest.raises(ValueError, match="importance_sampling_level='word' is not one of"):
        GRPOConfig(importance_sampling_level="word")
    with pytest.raises(ValueError, match="delta=0.9 must be > 1"):
        GRPOConfig(delta=0.9)
    with pytest.raises(ValueError, match=r"top_entropy_quantile=0 must lie in \(0, 1\]"):
        GRPOConfig(top_entropy_quantile=0)


def test_the_loop_masks_truncated_completions_before_counting():
    """Driver side: a completion that used every new token without an EOS carries no loss, and the global
    token count (dapo's num_items_in_batch) is taken after that masking, as TRL 1.x does."""
    from elastic.core.tokenizer import EOS
    from elastic.recipes.grpo.loop import GRPOLoop
    from elastic.recipes.grpo.recipe import grpo_config

    cfg = grpo_config(steps=1, workers=1, prompts_per_step=1, lora=False, num_generations=2, max_new_tokens=3,
                      mask_truncated_completions=True)
    loop = GRPOLoop(cfg)
    (index, _, _), = loop.prompts(0)
    tokens = torch.tensor([[ord("4"), ord("2"), ord("1")],  # truncated: 3 tokens, no EOS
                           [ord("7"), EOS, EOS]])  # stopped: "7" then EOS
    built = loop.build(0, [{"prompts": [index], "tokens": tokens, "lengths": torch.tensor([3, 2])}])
    assert built.rows["mask"].tolist() == [[False, False, False], [True, True, False]]
    assert built.batch.num_tokens == 2


def test_prompt_file_and_reward_function_errors_come_before_any_worker(tmp_path):
    import json

    from elastic.core.tokenizer import ByteTokenizer
    from elastic.recipes.grpo.prompts import PromptTask, resolve_reward_funcs
    from elastic.recipes.grpo.rewards import accuracy

    with pytest.raises(ValueError, match="cannot load reward function 'nosuch.module:f'"):
        resolve_reward_funcs("nosuch.module:f")
    with pytest.raises(ValueError, match="grpo.reward_weights='1,2' weighs grpo.reward_funcs, which is empty"):
        GRPOConfig(reward_weights="1,2")
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "1+1="}) + "\n" + json.dumps({"question": "2+2="}) + "\n")
    with pytest.raises(ValueError, match=r"columns \['question'\] lack 'prompt'"):
        PromptTask.from_file(path, ByteTokenizer(), 4, 64)
    path.write_text(json.dumps({"prompt": "x" * 70, "answer": "1"}) + "\n" + json.dumps({"prompt": "y"}) + "\n")
    with pytest.raises(ValueError, match="row 0: its prompt has 71 tokens, and with max_new_tokens=4 that exceeds "
                                         "the model's max_position_embeddings=64"):
        PromptTask.from_file(path, ByteTokenizer(), 4, 64)
    path.write_text(json.dumps({"prompt": "1+1=", "label": "2"}) + "\n" + json.dumps({"prompt": "2+2=", "label": "4"}))
    with pytest.raises(ValueError, match=r"the default reward \(exact-match accuracy\) compares with an 'answer' "
                                         r"column, and its columns are \['prompt', 'label'\]"):
        GRPOLoop(grpo_config(data=str(path), workers=1))
    assert accuracy(["q", "q"], ["42\nbecause", "41"], ["42", "42"]) == [1.0, 0.0]
    broken = [("tests:broken", lambda **kw: [1.0])]  # one value for two completions
    with pytest.raises(ValueError, match="returned 1 for 2 completions"):
        score_batch(broken, ["a", "b"], ["x", "y"], {}, [[1], [2]])
    with pytest.raises(ValueError, match="grpo.reward_weights='1.0' has 1 finite weights for 2 reward functions"):
        parse_weights("1.0", 2)


def test_reward_weights_combine_as_trl_does():
    """TRL: rewards_per_func [N, F] times reward_weights, nansum over the functions (None is NaN)."""
    first = [1.0, None, 0.0, 2.0]
    second = [0.5, 1.0, None, -1.0]
    funcs = [("a", lambda **kw: first), ("b", lambda **kw: second)]
    weights = parse_weights("2.0,-0.5", 2)
    ours = score_batch(funcs, list("pqrs"), list("wxyz"), {}, [[1]] * 4, weights)
    per_func = torch.tensor([[math.nan if v is None else v for v in f] for f in (first, second)],
                            dtype=torch.float64).T
    trl = (per_func * torch.tensor(weights, dtype=torch.float64)[None, :]).nansum(dim=1)
    assert torch.equal(ours, trl), (ours, trl)


def test_builtin_tasks_are_prompt_sets_on_the_same_path():
    """A built-in task's rows are its problems with their answers, tokenized as the task itself does, and
    scored by the default accuracy on the answer column exactly as the task's own exact-answer reward."""
    from elastic.core.data import ArithmeticTask
    from elastic.core.tokenizer import ByteTokenizer
    from elastic.recipes.grpo.prompts import PromptTask, reward_functions
    from elastic.recipes.grpo.rewards import SortDigitsTask, arithmetic_reward, sort_digits_reward

    tok = ByteTokenizer()
    for name, cls, exact in (("arithmetic", ArithmeticTask, arithmetic_reward),
                             ("sort_digits", SortDigitsTask, sort_digits_reward)):
        prompts = PromptTask.builtin(name, 24, 300, 3, tok, 6, 64)
        task = cls(24, 300, 3)
        assert len(prompts) == 300 and prompts.holdout_size() == task.holdout_size()
        for i in (0, 7, 299):
            assert prompts.prompt_ids(i) == task.prompt_ids(i) and all(prompts.prompt_mask(i))
            assert prompts.problem(i, "holdout") == task.problem(i, "holdout")
        ids = list(range(40))
        completions = [task.problem(i).answer if i % 3 else task.problem(i).answer + "1" for i in ids]
        funcs = reward_functions("", "")
        got = score_batch(funcs, [prompts.row(i)["prompt"] for i in ids], completions,
                          {"answer": [prompts.row(i)["answer"] for i in ids]}, [[0]] * len(ids))
        assert got.tolist() == [exact(task.problem(i).prompt, c) for i, c in zip(ids, completions, strict=True)]
        assert 0 < got.sum() < len(ids)
