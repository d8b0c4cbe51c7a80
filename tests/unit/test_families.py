"""Model families against transformers itself: Llama 3 (scaled RoPE, tied: SmolLM2's shape), Qwen2
(q/k/v biases, tied), Qwen3 (q/k norms, a head_dim of its own, attention biases) and Mistral.

Each folder is a random small model written by transformers' ``save_pretrained``; the loader is the
one that reads a downloaded folder. Logits must equal transformers' within 1e-5 in float32, and a
folder we write back must load in transformers with the same logits (tied stays tied).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from elastic.core.config import Config, DataConfig, ModelConfig
from elastic.model.hf import load_hf_model, save_hf_model, token_ids_of
from elastic.model.llama import KVCache, LlamaStage

SHAPE = dict(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.2)
FAMILIES = {
    # SmolLM2 / Llama 3.2: Llama with Llama 3's RoPE scaling and tied embeddings.
    "llama3-tied": (transformers.LlamaConfig, dict(
        tie_word_embeddings=True, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 16})),
    "llama-bias": (transformers.LlamaConfig, dict(attention_bias=True, head_dim=24)),
    "qwen2-tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=24, attention_bias=True)),
    "mistral": (transformers.MistralConfig, dict(head_dim=16, sliding_window=64)),
}
FLAGS = {  # what our config must say for each
    "llama3-tied": dict(family="llama", tie_embeddings=True, rope_type="llama3", rope_factor=32.0),
    "llama-bias": dict(family="llama", qkv_bias=True, o_bias=True, head_dim=24),
    "qwen2-tied": dict(family="qwen2", qkv_bias=True, o_bias=False, tie_embeddings=True),
    "qwen3": dict(family="qwen3", qk_norm=True, head_dim=24, qkv_bias=True, o_bias=True),
    "mistral": dict(family="mistral", sliding_window=64, head_dim=16),
}


def write_folder(path, family: str, **overrides):
    cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    hf_cfg = cls(**{**SHAPE, **extra, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():  # biases and norms start at 0 and 1: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    model.save_pretrained(path)
    return path, model


def tokens(t: int = 40) -> torch.Tensor:  # 40 > original_max_position_embeddings: llama3 scaling is in play
    return torch.randint(0, 259, (2, t), generator=torch.Generator().manual_seed(3))


def rel_max(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_equal_transformers_and_export_round_trips(tmp_path, family):
    folder, hf = write_folder(tmp_path / "in", family)
    cfg, state = load_hf_model(folder)
    for key, value in FLAGS[family].items():
        assert getattr(cfg, key) == value, (key, getattr(cfg, key))
    ours = LlamaStage(cfg).eval()
    ours.load_state_dict(state, strict=True)
    x = tokens()
    with torch.no_grad():
        theirs = hf(x).logits
        assert rel_max(ours(x), theirs) <= 1e-5
        # Incremental decoding with the KV cache computes the same last-position logits.
        cache = KVCache()
        ours(x[:, :-1], 0, cache)
        assert rel_max(ours(x[:, -1:], x.shape[1] - 1, cache)[:, -1], theirs[:, -1]) <= 1e-5
    out = save_hf_model(tmp_path / "out", cfg, state, token_ids_of(folder))
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (again.config.bos_token_id, again.config.eos_token_id) == (hf.config.bos_token_id, hf.config.eos_token_id)
    assert again.config.tie_word_embeddings == cfg.tie_embeddings
    assert type(again) is type(hf)
    if cfg.tie_embeddings:
        assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert rel_max(again(x).logits, theirs) <= 1e-5
    assert load_hf_model(out)[0] == cfg


def test_num_params_counts_what_the_model_holds(tmp_path):
    for family in FAMILIES:
        cfg, _ = load_hf_model(write_folder(tmp_path / family, family)[0])
        assert cfg.num_params() == sum(p.numel() for p in LlamaStage(cfg).parameters()), family


def edited(tmp_path, family: str, name: str, edit: dict):
    folder, _ = write_folder(tmp_path / f"{family}-src", family)
    target = tmp_path / name
    target.mkdir()
    raw = json.loads((folder / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**raw, **edit}))
    (target / "model.safetensors").symlink_to(folder / "model.safetensors")
    return target


@pytest.mark.parametrize("family,edit,message", [
    ("llama3-tied", {"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "model_type='gemma'"),
    ("llama-bias", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "rope_type='linear' is unsupported"),
    ("mistral", {"attention_bias": True}, "attention_bias=True is unsupported: Mistral"),
    ("qwen2-tied", {"use_sliding_window": True, "sliding_window": 32}, "use_sliding_window=True is unsupported"),
    ("qwen3", {"attention_dropout": 0.1}, "attention_dropout=0.1 is unsupported"),
])
def test_unsupported_configs_are_refused_with_the_field(tmp_path, family, edit, message):
    with pytest.raises(ValueError, match=message):
        load_hf_model(edited(tmp_path, family, "bad", edit))


def test_mistral_window_the_sequence_would_exceed_is_refused(tmp_path):
    cfg, _ = load_hf_model(write_folder(tmp_path / "m", "mistral")[0])
    Config(model=cfg, data=DataConfig(seq_len=64))  # within the window: sliding = full attention
    with pytest.raises(ValueError, match="data.seq_len=65 exceeds the model's sliding_window=64"):
        Config(model=cfg, data=DataConfig(seq_len=65))


def test_tied_model_refuses_pipeline_layouts():
    from elastic.core.layout import Layout

    cfg = ModelConfig(tie_embeddings=True)
    with pytest.raises(ValueError, match="ties its LM head to its embedding.*use pp=1"):
        Layout.parse("pp=2,mb=2").validate(cfg, global_batch=8)
    Layout.parse("dp=2,tp=2").validate(cfg, global_batch=8)


def test_box_reads_of_a_sharded_bf16_folder_equal_the_full_tensors(tmp_path):
    """What each rank reads at start-up (``BoxReader``, safetensors slices) from a bf16 folder saved in
    shards (``model.safetensors.index.json``) is exactly the box of the full tensor."""
    from elastic.model.hf import BoxReader

    folder, model = write_folder(tmp_path / "in", "qwen2-tied")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="40KB")
    sharded = tmp_path / "bf16"
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    cfg, full = load_hf_model(sharded)
    assert all(t.dtype == torch.bfloat16 for t in full.values())
    reader = BoxReader(sharded, cfg)
    for name, box in [("model.embed_tokens.weight", ((0, 130), (16, 48))),
                      ("model.layers.1.self_attn.q_proj.bias", ((32, 64),)),
                      ("model.layers.0.mlp.down_proj.weight", ((0, 64), (48, 96)))]:
        got = reader.read(name, box, torch.float32)
        want = full[name][tuple(slice(lo, hi) for lo, hi in box)].float()
        assert torch.equal(got, want), name
