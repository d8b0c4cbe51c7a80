"""LoRA on the Llama decoder: merge math, PEFT-style init, freezing, specs and sharding rules, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from elastic.core.config import MODEL_PRESETS, ModelConfig
from elastic.core.layout import TensorSpec
from elastic.model.init import init_tensor
from elastic.model.llama import LlamaStage, tensor_specs
from elastic.model.lora import (
    DEFAULT_TARGETS,
    DropoutRows,
    LoraConfig,
    LoRALinear,
    apply_lora,
    dropout_rows,
    frozen_base_specs,
    init_lora_tensor,
    lora_model_specs,
    lora_modules,
    lora_state_dict,
    lora_tensor_specs,
    merge_lora,
    merge_state_dict,
    unmerge_lora,
)

CFG = MODEL_PRESETS["tiny"]
LORA = LoraConfig(r=4, alpha=8.0)


def base_model(cfg: ModelConfig = CFG, seed: int = 0) -> LlamaStage:
    model = LlamaStage(cfg).double()
    specs = {s.name: s for s in tensor_specs(cfg)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_tensor(specs[name], cfg, seed, torch.float64))
    return model.eval()


def randomise_adapters(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B (a fresh adapter is a no-op, which would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)


def tokens(batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(7))


def test_fresh_adapters_leave_the_model_unchanged():
    base = base_model()
    lora = apply_lora(copy.deepcopy(base), LORA, seed=3)
    x = tokens()
    assert torch.equal(lora(x), base(x))  # B is zero: the adapter path adds exact zeros
    assert all(torch.count_nonzero(m.lora_A.weight) > 0 for m in lora_modules(lora).values())


def test_merged_weights_equal_base_plus_adapter_and_unmerge_restores():
    base = base_model()
    model = apply_lora(copy.deepcopy(base), LORA, seed=3)
    randomise_adapters(model)
    x = tokens()
    with_adapters = model(x)
    assert not torch.allclose(with_adapters, base(x), atol=1e-6)
    expected = merge_state_dict(base.state_dict(), lora_state_dict(model), LORA)
    merge_lora(model)
    assert all(m.merged for m in lora_modules(model).values())
    for name, w in expected.items():
        assert torch.allclose(model.state_dict()[name], w, rtol=0, atol=1e-14), name
    assert torch.allclose(model(x), with_adapters, rtol=0, atol=1e-12)
    merge_lora(model)  # merging twice is a no-op, not a double update
    assert torch.allclose(model(x), with_adapters, rtol=0, atol=1e-12)
    # A plain model loaded with the merged weights computes the same logits.
    plain = copy.deepcopy(base)
    plain.load_state_dict(expected)
    assert torch.allclose(plain(x), with_adapters, rtol=0, atol=1e-12)
    unmerge_lora(model)
    assert not any(m.merged for m in lora_modules(model).values())
    for name, w in base.state_dict().items():
        assert torch.allclose(model.state_dict()[name], w, rtol=0, atol=1e-14), name
    assert torch.allclose(model(x), with_adapters, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_follows_peft(rslora):
    cfg = LoraConfig(r=16, alpha=8.0, use_rslora=rslora)
    assert cfg.scaling == (8.0 / 4.0 if rslora else 8.0 / 16)
    layer = LoRALinear(6, 5, r=16, alpha=8.0, use_rslora=rslora).double()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 6, dtype=torch.float64)
    manual = x @ layer.weight.T + cfg.scaling * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    assert torch.allclose(layer(x), manual, atol=1e-12)


def test_init_is_peft_kaiming_uniform_deterministic_and_layout_independent():
    in_features = 64
    spec = TensorSpec("model.layers.0.mlp.gate_proj.lora_A.weight", (16, in_features))
    a = init_lora_tensor(spec, LORA, seed=5, dtype=torch.float64)
    # nn.init.kaiming_uniform_(a=sqrt(5)) bound: gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in).
    gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    bound = gain * math.sqrt(3.0 / in_features)
    assert bound == pytest.approx(1 / math.sqrt(in_features))
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert abs(a.mean()) < 0.1 * bound and a.var().item() == pytest.approx(bound**2 / 3, rel=0.2)
    assert torch.equal(a, init_lora_tensor(spec, LORA, seed=5, dtype=torch.float64))
    assert not torch.equal(a, init_lora_tensor(spec, LORA, seed=6, dtype=torch.float64))
    assert not torch.equal(a, init_lora_tensor(spec.renamed(spec.name.replace("gate", "up")), LORA, 5, torch.float64))
    # float32 and float64 runs start from the same values.
    assert torch.equal(a.float(), init_lora_tensor(spec, LORA, seed=5, dtype=torch.float32))
    b_spec = TensorSpec("model.layers.0.mlp.gate_proj.lora_B.weight", (128, 16))
    assert torch.count_nonzero(init_lora_tensor(b_spec, LORA, seed=5, dtype=torch.float32)) == 0
    # apply_lora(seed=...) installs exactly these values; PEFT's global-RNG init stays within the same bound.
    model = apply_lora(base_model(), LORA, seed=5)
    for spec in lora_tensor_specs(CFG, LORA):
        assert torch.equal(model.get_parameter(spec.name), init_lora_tensor(spec, LORA, 5, torch.float64))
    fresh = LoRALinear(in_features, 8, r=4, alpha=8.0)
    assert fresh.lora_A.weight.abs().max() <= bound and torch.count_nonzero(fresh.lora_B.weight) == 0


def test_meta_build_then_materialise_matches_eager_build():
    with torch.device("meta"):
        meta = LlamaStage(CFG)
    apply_lora(meta, LORA)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.double()
    specs = {s.name: s for s in lora_model_specs(CFG, LORA)}
    with torch.no_grad():
        for name, p in meta.named_parameters():
            spec = specs[name]
            value = init_lora_tensor(spec, LORA, 0, p.dtype) if ".lora_" in name else init_tensor(spec, CFG, 0, p.dtype)
            p.copy_(value)
    eager = apply_lora(base_model(seed=0), LORA, seed=0)
    x = tokens()
    assert torch.equal(meta.eval()(x), eager(x))


def test_only_adapters_train():
    model = apply_lora(base_model(), LORA, seed=0).train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(DEFAULT_TARGETS) * CFG.n_layers
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = tokens(4, 12)
    for _ in range(3):
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, CFG.vocab_size), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert p.grad is None and torch.equal(p, before[name]), f"{name} changed"


def test_specs_match_modules_and_sharding_rules():
    lora_cfg = LoraConfig(r=4, targets=("q_proj", "o_proj", "mlp.up_proj", "down_proj"))
    model = apply_lora(base_model(), lora_cfg, seed=0)
    specs = lora_tensor_specs(CFG, lora_cfg)
    lora_params = [(n, tuple(p.shape)) for n, p in model.named_parameters() if ".lora_" in n]
    assert [(s.name, s.shape) for s in specs] == lora_params
    rules = {s.name.split(".", 3)[-1]: (s.tp_dim, s.owner, s.trainable) for s in specs if s.layer == 1}
    assert rules == {
        "self_attn.q_proj.lora_A.weight": (None, "layer", True),  # colwise base: A replicated
        "self_attn.q_proj.lora_B.weight": (0, "layer", True),  # ... B split on its output
        "self_attn.o_proj.lora_A.weight": (1, "layer", True),  # rowwise base: A split on its input
        "self_attn.o_proj.lora_B.weight": (None, "layer", True),  # ... B replicated
        "mlp.up_proj.lora_A.weight": (None, "layer", True),
        "mlp.up_proj.lora_B.weight": (0, "layer", True),
        "mlp.down_proj.lora_A.weight": (1, "layer", True),
        "mlp.down_proj.lora_B.weight": (None, "layer", True),
    }
    assert {s.layer for s in specs} == {0, 1}
    frozen = frozen_base_specs(CFG)
    assert [s.name for s in frozen] == [s.name for s in tensor_specs(CFG)] and not any(s.trainable for s in frozen)
    full = lora_model_specs(CFG, lora_cfg)
    assert [(s.name, s.shape) for s in full] == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert [s.name for s in full if s.trainable] == [n for n, p in model.named_parameters() if p.requires_grad]
    # The LM head has no tp style (replicated), so neither do its adapters; they live on the last stage.
    head = lora_tensor_specs(CFG, LoraConfig(r=4, targets=("lm_head",)))
    assert [(s.name, s.shape, s.tp_dim, s.owner) for s in head] == [
        ("lm_head.lora_A.weight", (4, CFG.dim), None, "head"),
        ("lm_head.lora_B.weight", (CFG.vocab_size, 4), None, "head"),
    ]
    assert [n for n, _ in apply_lora(base_model(), LoraConfig(r=4, targets=("lm_head",))).named_parameters()
            if ".lora_" in n] == [s.name for s in head]


@pytest.mark.parametrize("module", ["self_attn.q_proj", "mlp.down_proj"])
def test_tp_split_of_adapters_reproduces_the_full_layer(module):
    """Slicing weights by the specs' tp_dim and running Megatron-style tp=2 by hand gives the full output."""
    model = apply_lora(base_model(), LORA, seed=0)
    randomise_adapters(model)
    layer = model.get_submodule(f"model.layers.0.{module}")
    prefix = f"model.layers.0.{module}."
    specs = {s.name.split(".")[-2]: s for s in lora_tensor_specs(CFG, LORA) if s.name.startswith(prefix)}
    base_dim = 0 if module.endswith("q_proj") else 1  # TP_PLAN: q colwise, down rowwise
    x = torch.randn(3, layer.in_features, dtype=torch.float64)
    tp = 2

    def shard(t: torch.Tensor, dim: int | None, rank: int) -> torch.Tensor:
        return t if dim is None else t.chunk(tp, dim)[rank]

    outs = []
    for rank in range(tp):
        w = shard(layer.weight, base_dim, rank)
        a = shard(layer.lora_A.weight, specs["lora_A"].tp_dim, rank)
        b = shard(layer.lora_B.weight, specs["lora_B"].tp_dim, rank)
        xr = x if base_dim == 0 else x.chunk(tp, -1)[rank]  # rowwise layers see an input slice
        outs.append(xr @ w.T + layer.scaling * (xr @ a.T @ b.T))
    combined = torch.cat(outs, -1) if base_dim == 0 else sum(outs)  # colwise: gather; rowwise: all-reduce
    assert torch.allclose(combined, layer(x), atol=1e-12)


def test_dropout_applies_only_to_named_rows_in_training():
    layer = LoRALinear(8, 8, r=2, alpha=2.0, dropout=0.5).double()
    layer.name = "model.layers.0.self_attn.q_proj"
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    plain = layer.eval()(x)
    layer.train()
    assert torch.equal(layer(x), plain)  # no rows named (evaluation, sampling, log-prob passes): no dropout
    with dropout_rows(seed=1, step=4, samples=[10, 11]):
        dropped = layer(x)
        assert torch.equal(layer(x), dropped)  # no RNG state: the same rows give the same masks
        assert torch.equal(layer.eval()(x), plain)  # eval mode: no dropout
        layer.train()
    assert not torch.allclose(dropped, plain)
    # A row's mask is its sample's, whatever its batch-mates: sample 11 alone gives row 1's output.
    with dropout_rows(seed=1, step=4, samples=[11]):
        assert torch.allclose(layer(x[1:]), dropped[1:], rtol=0, atol=1e-12)  # BLAS may block 1 row differently
    with dropout_rows(seed=1, step=4, samples=[10]), pytest.raises(RuntimeError, match="1 sample indices for a batch"):
        layer(x)


def test_dropout_masks_are_replayable_and_differ_across_samples_steps_and_modules():
    p, shape = 0.25, (16, 64)
    mask = DropoutRows(seed=7, step=3, samples=(5, 9, 5)).mask("m.q_proj", shape, p, torch.float64)
    assert mask.shape == (3, *shape) and set(mask.unique().tolist()) == {0.0, 1 / (1 - p)}
    assert torch.equal(mask, DropoutRows(7, 3, (5, 9, 5)).mask("m.q_proj", shape, p, torch.float64))  # replayable
    assert torch.equal(mask[0], mask[2]) and not torch.equal(mask[0], mask[1])  # per sample
    assert torch.equal(mask[1], DropoutRows(7, 3, (9,)).mask("m.q_proj", shape, p, torch.float64)[0])
    for other in (DropoutRows(7, 4, (5,)), DropoutRows(8, 3, (5,))):  # another step, another seed
        assert not torch.equal(other.mask("m.q_proj", shape, p, torch.float64)[0], mask[0])
    assert not torch.equal(DropoutRows(7, 3, (5,)).mask("m.k_proj", shape, p, torch.float64)[0], mask[0])
    kept = float((mask > 0).double().mean())
    assert abs(kept - (1 - p)) < 0.03, kept


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match=r"lora target 'qkv_proj' names no nn.Linear.*'q_proj'"):
        apply_lora(base_model(), LoraConfig(targets=("q_proj", "qkv_proj")))
    with pytest.raises(ValueError, match="lora.r=0 must be a positive integer"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match="lora.r=-2"):
        LoraConfig(r=-2)
    with pytest.raises(ValueError, match="lora.dropout"):
        LoraConfig(dropout=1.0)
    with pytest.raises(ValueError, match="lora.alpha"):
        LoraConfig(alpha=0)
    with pytest.raises(ValueError, match="list of module names"):
        LoraConfig(targets="q_proj")
    with pytest.raises(ValueError, match="more than once"):
        LoraConfig(targets=("q_proj", "q_proj"))
    with pytest.raises(ValueError, match="names no linear layer"):
        lora_tensor_specs(CFG, LoraConfig(targets=("embed_tokens",)))
    model = apply_lora(base_model(), LORA)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(model, LORA)
    assert LoraConfig(targets=["q_proj"]).targets == ("q_proj",)  # lists from JSON become tuples
