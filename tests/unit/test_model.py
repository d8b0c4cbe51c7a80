"""The Llama-style model: HF names, stages, KV cache and sampling."""

from __future__ import annotations

import torch

from elastic.core.config import MODEL_PRESETS, ModelConfig
from elastic.core.layout import Layout, Placement
from elastic.model.generate import SamplingConfig, sample
from elastic.model.init import init_tensor
from elastic.model.llama import LlamaStage, tensor_specs

CFG = MODEL_PRESETS["tiny"]


def build(cfg: ModelConfig = CFG, layers=None, first=True, last=True, seed=0) -> LlamaStage:
    model = LlamaStage(cfg, layers, first, last).double()
    specs = {s.name: s for s in tensor_specs(cfg)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_tensor(specs[name], cfg, seed, torch.float64))
    return model


def test_parameter_names_follow_hugging_face_llama():
    names = [n for n, _ in build().named_parameters()]
    assert names[0] == "model.embed_tokens.weight"
    assert "model.layers.1.self_attn.q_proj.weight" in names
    assert "model.layers.0.mlp.down_proj.weight" in names
    assert "model.layers.0.post_attention_layernorm.weight" in names
    assert names[-2:] == ["model.norm.weight", "lm_head.weight"]
    specs = {s.name: s.shape for s in tensor_specs(CFG)}
    assert specs == {n: tuple(p.shape) for n, p in build().named_parameters()}
    assert CFG.num_params() == sum(p.numel() for p in build().parameters())


def test_pipeline_stages_compose_to_the_full_model():
    full = build(ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48))
    cfg = full.cfg
    layout = Layout(pp=2)
    stages = [build(cfg, layout.stage_layers(s, 3), s == 0, s == 1) for s in range(2)]
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    assert torch.allclose(stages[1](stages[0](x)), full(x), rtol=0, atol=1e-12)
    assert [n for n, _ in stages[1].named_parameters()][0].startswith("model.layers.2.")


def test_attention_is_causal():
    model = build()
    x = torch.randint(0, 256, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 256
    assert torch.allclose(model(x)[0, :8], model(y)[0, :8], atol=1e-12)
    assert not torch.allclose(model(x)[0, 8:], model(y)[0, 8:])


def test_kv_cache_decoding_matches_full_forward():
    model = build()
    x = torch.randint(0, 256, (3, 10))
    full = model(x)
    from elastic.model.llama import KVCache

    cache = KVCache()
    steps = [model(x[:, :6], 0, cache)]
    for t in range(6, 10):
        steps.append(model(x[:, t : t + 1], t, cache))
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-10)


def test_greedy_sampling_matches_argmax_rollout_and_stops():
    model = build()
    prompt = torch.randint(0, 256, (2, 5))
    tokens, lengths = sample(model, prompt, SamplingConfig(max_new_tokens=6, temperature=0))
    seq = prompt.clone()
    for _ in range(6):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(tokens, seq[:, 5:]) and lengths.tolist() == [6, 6]
    stop = int(tokens[0, 2])
    _, lengths = sample(model, prompt[:1], SamplingConfig(max_new_tokens=6, temperature=0, stop_ids=(stop,)))
    assert lengths.tolist() == [int((tokens[0] == stop).nonzero()[0]) + 1]


def test_seeded_sampling_is_per_sequence():
    model = build()
    prompt = torch.randint(0, 256, (1, 5))
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9)
    alone, _ = sample(model, prompt, cfg, [torch.Generator().manual_seed(7)])
    pair, _ = sample(model, prompt.repeat(2, 1), cfg,
                     [torch.Generator().manual_seed(3), torch.Generator().manual_seed(7)])
    assert torch.equal(alone[0], pair[1])


def test_box_init_slices_the_full_init():
    from elastic.model.init import init_box

    spec = tensor_specs(CFG)[2]
    placement = Placement(Layout(fsdp=2, tp=2), (0, 1, 2, 3))
    full = init_tensor(spec, CFG, 5, torch.float32)
    for rank in range(4):
        box = placement.box(spec, rank, CFG.n_layers)
        part = init_box(spec, box, CFG, 5, torch.float32)
        assert torch.equal(part, full[tuple(slice(a, b) for a, b in box)])
