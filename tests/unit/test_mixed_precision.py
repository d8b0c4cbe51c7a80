"""Mixed precision (``train.mixed_precision = "bf16"``): bf16 compute over float32 master state.

One process, the engine itself at world 1 against the independent reference's autocast branch
(``tests/reference.py``): same data, same order of operations, so the two agree far more closely than either
agrees with a float32 run. That the engine's matmuls really ran in bf16 while its weights, gradients and AdamW
moments stayed float32 is asserted directly. The layouts (fsdp, tp, dp, pp) across a live reshard are in
``tests/integration/test_equivalence.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from elastic.core.config import LoraConfig, TrainConfig
from elastic.core.layout import Layout, Placement
from elastic.model.specs import param_specs, stored_in_bf16
from elastic.runtime.engine import Engine
from tests.helpers import tiny_config, worst_update_err
from tests.reference import train_reference

STEPS = 4


def mixed(cfg, mode: str = "bf16"):
    return cfg.replace(train=dataclasses.replace(cfg.train, mixed_precision=mode))


@pytest.mark.parametrize("changes, words", [
    ({"mixed_precision": "fp16"}, "train.mixed_precision='fp16' is not one of no, bf16"),
    ({"mixed_precision": "bf16", "dtype": "bfloat16"}, "needs train.dtype='float32', not 'bfloat16'"),
    ({"mixed_precision": "bf16", "dtype": "float64"}, "needs train.dtype='float32', not 'float64'"),
])
def test_a_mixed_precision_that_makes_no_sense_is_refused(changes, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**changes)
    assert TrainConfig(mixed_precision="bf16").dtype == "float32"


def test_trl_bf16_is_mixed_precision():
    from launch.cli import parser
    from launch.run_config import plan_run
    from launch.trl_names import translate

    assert translate({"bf16": True}, "x").overrides == {"train": {"mixed_precision": "bf16"}}
    assert translate({"bf16": False}, "x").inert == ["bf16"]
    with pytest.raises(ValueError, match="fp16=True is not implemented here"):
        translate({"fp16": True}, "x")
    for flags in (["--bf16"], ["--bf16", "true"], ["--train.mixed_precision", "bf16"]):
        cfg = plan_run(parser().parse_args(["train", "--model", "tiny", *flags])).cfg
        assert cfg.train.mixed_precision == "bf16" and cfg.train.dtype == "float32", flags


def run_engine(cfg):
    """``cfg.train.steps`` steps at world 1; the dtypes seen on the way: matmul outputs, stage output, gradients."""
    engine = Engine(cfg, Placement(Layout(), (0,)), 0)
    seen = set()
    proj = engine.module.model.layers["0"].self_attn.q_proj
    hooks = [proj.register_forward_hook(lambda m, i, out: seen.add(("q_proj", out.dtype))),
             engine.module.model.layers["0"].register_forward_hook(lambda m, i, out: seen.add(("layer", out.dtype)))]
    losses = []
    for _ in range(cfg.train.steps):
        result = engine.compute()
        seen |= {("grad", p.grad.dtype) for _, p, _ in engine.trainable}
        engine.apply()
        losses.append(result.loss)
    for hook in hooks:
        hook.remove()
    return losses, engine.local_tensors(), seen


# The worst parameter's update error against the autocast reference (tests/helpers.worst_update_err), measured
# 1.4e-3 (full) and 1.6e-2 (LoRA: A's gradient is zero until B moves, so A starts from near-zero gradients whose
# rounding AdamW turns into +-lr steps); a float32 run measured 9.6e-2 and 0.28 away.
@pytest.mark.parametrize("lora, tolerance", [(None, 1e-2), (LoraConfig(r=4, alpha=8.0, dropout=0.3), 5e-2)],
                         ids=["full", "lora-dropout"])
def test_the_engine_computes_in_bf16_and_keeps_float32_state_as_the_autocast_reference(lora, tolerance):
    cfg = tiny_config(dtype="float32", steps=STEPS).replace(lora=lora)
    losses, state, seen = run_engine(mixed(cfg))
    # bf16 matmuls; the residual stream (what pipeline stages pass on), gradients and every state tensor float32.
    assert seen == {("q_proj", torch.bfloat16), ("layer", torch.float32), ("grad", torch.float32)}
    assert {t.dtype for t in state.values()} == {torch.float32}
    ref = train_reference(mixed(cfg))
    start = train_reference(cfg, steps=0).tensors
    # LoRA's frozen matmul weights are kept at their bf16 rounding (what autocast multiplies by anyway, see
    # test_frozen_base_stored_in_bf16_changes_no_value): that is their whole change; the rest is compared below.
    frozen = {s.name for s in param_specs(mixed(cfg)) if stored_in_bf16(mixed(cfg), s)}
    assert bool(frozen) == (lora is not None)
    assert all(torch.equal(state[k], start[k].bfloat16().float()) for k in frozen)
    ref = dataclasses.replace(ref, tensors={k: v for k, v in ref.tensors.items() if k not in frozen})
    err, name = worst_update_err(state, ref.tensors, start)
    far, far_name = worst_update_err(state, train_reference(cfg).tensors, start)
    # One process and one batch, as the reference: only float32 roundings differ (the engine's float64 clipping
    # norm, AdamW's implementation: 2e-6 apart in float32), which bf16 roundings seldom turn into a flip. A
    # float32 run, or an engine that ignored mixed_precision, is a bf16 rounding away in every matmul.
    assert err <= tolerance, f"{name}: {err:.2e} from the autocast reference"
    assert far >= 4 * tolerance, f"{far_name}: only {far:.2e} from the float32 run"
    assert max(abs(a - b) / b for a, b in zip(losses, ref.losses, strict=True)) <= 1e-4


def test_sampling_with_a_cache_and_left_padding_runs_in_bf16():
    """GRPO's rollouts and evaluation call the same forward: its KV cache fills in bf16, and the samples
    are tokens of the vocabulary (a smoke test: the sampler's own tests are float32 and float64)."""
    from elastic.model.generate import SamplingConfig, sample

    engine = Engine(mixed(tiny_config(dtype="float32")), Placement(Layout(), (0,)), 0)
    prompts = torch.tensor([[0, 5, 6, 7], [3, 4, 5, 6]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with torch.no_grad():
        tokens, _ = sample(engine.module, prompts, SamplingConfig(max_new_tokens=3), gens, prompt_mask=mask)
    assert tokens.shape == (2, 3) and 0 <= int(tokens.min()) and int(tokens.max()) < engine.cfg.model.vocab_size


def test_checkpointed_layers_recompute_under_autocast_bit_for_bit():
    """The recompute in backward must run in bf16 as the forward did (torch.utils.checkpoint replays the
    autocast state); in float32 it would give other gradients."""
    cfg = mixed(tiny_config(dtype="float32", steps=2))
    plain = run_engine(cfg)
    ckpt = run_engine(cfg.replace(train=dataclasses.replace(cfg.train, activation_checkpointing=True)))
    assert plain[0] == ckpt[0] and all(torch.equal(plain[1][k], ckpt[1][k]) for k in plain[1])


def test_frozen_base_stored_in_bf16_changes_no_value():
    """LoRA's frozen matmul weights stored in bf16 (``train.frozen_bf16``, the default) against the same run
    storing them in float32: autocast rounds a float32 weight to bf16 (to nearest even) before every matmul, the
    engine rounds it the same way once at load, so every loss, adapter and AdamW moment is bit-for-bit the same,
    and the frozen weights are the float32 run's rounded. The embedding (a lookup; the LM head too when tied),
    norms and adapters stay float32; the state handed out (reshards, snapshots, exports) is float32."""
    cfg = mixed(tiny_config(dtype="float32", steps=3).replace(lora=LoraConfig(r=4, alpha=8.0, dropout=0.3)))
    keep = cfg.replace(train=dataclasses.replace(cfg.train, frozen_bf16=False))
    frozen = {s.name for s in param_specs(cfg) if stored_in_bf16(cfg, s)}
    n_layers = cfg.model.n_layers
    assert len(frozen) == 7 * n_layers + (not cfg.model.tie_embeddings) and "model.embed_tokens.weight" not in frozen
    engine = Engine(cfg, Placement(Layout(), (0,)), 0)
    dtypes = {name: p.dtype for name, p in engine.named_params}
    assert {dtypes[k] for k in frozen} == {torch.bfloat16}
    assert {v for k, v in dtypes.items() if k not in frozen} == {torch.float32}
    losses, state, _ = run_engine(cfg)
    kept_losses, kept, _ = run_engine(keep)
    assert losses == kept_losses and set(state) == set(kept)
    assert all(torch.equal(state[k], kept[k].bfloat16().float() if k in frozen else kept[k]) for k in kept)
    assert any(not torch.equal(state[k], kept[k]) for k in frozen), "the float32 run's weights were bf16 already"
    tied = dataclasses.replace(cfg.model, tie_embeddings=True)
    assert not any(stored_in_bf16(cfg.replace(model=tied), s) for s in param_specs(cfg.replace(model=tied))
                   if "embed" in s.name)


def test_a_dcp_checkpoint_of_a_bf16_frozen_base_loads_either_way(tmp_path):
    """DCP saves the parameters as the engine stores them (the frozen base in bf16); it loads into an engine
    that stores them in bf16 or in float32 (torch converts on load), both exactly the saved state."""
    from elastic.runtime.dcp import DcpLoad, DcpSave
    from elastic.runtime.tasks import TaskContext

    cfg = mixed(tiny_config(dtype="float32", steps=2).replace(lora=LoraConfig(r=4, alpha=8.0)))
    engine = Engine(cfg, Placement(Layout(), (0,)), 0)
    for _ in range(2):
        engine.compute()
        engine.apply()
    saved = engine.local_tensors()
    assert DcpSave(str(tmp_path)).run(TaskContext(0, engine)) == 2
    for frozen_bf16 in (True, False):
        again = cfg.replace(train=dataclasses.replace(cfg.train, frozen_bf16=frozen_bf16))
        loaded = Engine(again, Placement(Layout(), (0,)), 0, step=2, empty=True)
        assert DcpLoad(str(tmp_path)).run(TaskContext(0, loaded)) == 2
        state = loaded.local_tensors()
        assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved), frozen_bf16


def test_a_grpo_rollout_reads_a_bf16_frozen_base_as_float32():
    """GRPO's rollouts sample with the plain model outside autocast, from the engine's parameters: a frozen
    base stored in bf16 is read widened to float32 (it would otherwise meet float32 activations in a matmul)."""
    from elastic.recipes.grpo.config import GRPOConfig
    from elastic.recipes.grpo.worker import rollout

    cfg = mixed(tiny_config(dtype="float32").replace(lora=LoraConfig(r=4, alpha=8.0)))
    engine = Engine(cfg, Placement(Layout(), (0,)), 0)
    assert any(p.dtype == torch.bfloat16 for _, p in engine.named_params)
    grpo = dataclasses.replace(GRPOConfig(), num_generations=2, max_new_tokens=3, beta=0.1, num_iterations=2)
    out = rollout(engine, [(0, [5, 6, 7], None), (1, [8, 9, 10], None)], grpo, 0)
    assert out["tokens"].shape == (4, 3) and out["old"].dtype == torch.float32
    assert torch.isfinite(out["old"]).all() and torch.isfinite(out["ref"]).all()
