"""Hugging Face and PEFT interop: our loader, adapter writer and merged export against the real libraries.

Everything runs on tiny models written to a temporary folder by transformers itself (no downloads).
"""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from elastic.core.config import ModelConfig  # noqa: E402
from elastic.model.hf import export_merged, load_hf_model, save_hf_model  # noqa: E402
from elastic.model.llama import LlamaStage  # noqa: E402
from elastic.model.lora import LoraConfig, apply_lora, lora_state_dict  # noqa: E402
from elastic.model.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_peft_adapter, save_peft_adapter  # noqa: E402

HF_SHAPE = dict(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500.0,
                initializer_range=0.1)


def hf_folder(path, tied: bool = False, sharded: bool = False, **overrides):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**HF_SHAPE, **overrides}, tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": "30KB"} if sharded else {}))
    return path, model


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return hf_folder(tmp_path_factory.mktemp("hf_base"))[0]


def our_model(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> LlamaStage:
    model = LlamaStage(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 259, (2, 11), generator=torch.Generator().manual_seed(3))


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, rel: float = 1e-4) -> None:
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"


def lora_model(cfg, state, lora_cfg: LoraConfig, seed: int = 1) -> LlamaStage:
    """Our model with adapters set to non-zero random values (a fresh B = 0 would hide mistakes)."""
    model = apply_lora(our_model(cfg, state), lora_cfg, seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.mark.parametrize("variant", ["single", "sharded", "tied"])
def test_loaded_model_matches_transformers(tmp_path, variant):
    folder, hf = hf_folder(tmp_path, tied=variant == "tied", sharded=variant == "sharded")
    if variant == "sharded":
        assert len(list(folder.glob("model-*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").exists()
    cfg, state = load_hf_model(folder)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (64, 2, 4, 2, 96)
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.rope_theta, cfg.norm_eps) == (259, 128, 500.0, 1e-5)
    if variant == "tied":  # stays tied: the head is the embedding, no tensor of its own
        assert cfg.tie_embeddings and "lm_head.weight" not in state
    x = tokens()
    with torch.no_grad():
        assert_close(our_model(cfg, state)(x), hf(x).logits)


def test_save_hf_model_round_trips_and_transformers_reads_it(tmp_path, base_folder):
    cfg, state = load_hf_model(base_folder)
    save_hf_model(tmp_path / "out", cfg, state)
    cfg2, state2 = load_hf_model(tmp_path / "out")
    assert cfg2 == cfg and state2.keys() == state.keys()
    assert all(torch.equal(state2[k], state[k]) for k in state)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.tie_word_embeddings) == (256, 257, False)
    x = tokens()
    with torch.no_grad():
        assert_close(our_model(cfg, state)(x), hf(x).logits)


LORA_CASES = {
    "all-targets": LoraConfig(r=4, alpha=8.0),
    "rslora-subset": LoraConfig(r=8, alpha=6.0, targets=("q_proj", "v_proj", "down_proj"), use_rslora=True),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_peft_loads_our_adapters_and_computes_our_logits(tmp_path, base_folder, case):
    lora_cfg = LORA_CASES[case]
    cfg, state = load_hf_model(base_folder)
    ours = lora_model(cfg, state, lora_cfg)
    adapters = lora_state_dict(ours)
    adapter_dir = save_peft_adapter(tmp_path / "adapter", cfg, lora_cfg, adapters, str(base_folder))

    written = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    peft_keys = set(peft.LoraConfig(r=4, target_modules=["q_proj"]).to_dict())
    assert set(written) <= peft_keys, f"keys PEFT does not know: {set(written) - peft_keys}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base = transformers.LlamaForCausalLM.from_pretrained(base_folder)
        peft_model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    problems = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)
                or "Unexpected keyword" in str(w.message)]
    assert not problems, problems
    loaded_cfg = peft_model.peft_config["default"]
    assert (loaded_cfg.r, loaded_cfg.lora_alpha, loaded_cfg.use_rslora) == (lora_cfg.r, lora_cfg.alpha,
                                                                            lora_cfg.use_rslora)
    assert set(loaded_cfg.target_modules) == set(lora_cfg.targets)
    # Key for key: what PEFT holds after loading is exactly our file, and loading again reports no stray keys.
    on_disk = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    in_peft = peft.get_peft_model_state_dict(peft_model)
    assert set(in_peft) == set(on_disk) and len(on_disk) == len(adapters)
    assert all(torch.equal(in_peft[k], on_disk[k]) for k in on_disk)
    result = peft_model.load_adapter(adapter_dir, adapter_name="again")
    assert result.missing_keys == [] and result.unexpected_keys == []

    x = tokens()
    with torch.no_grad():
        theirs = peft_model(input_ids=x).logits
        assert_close(ours(x), theirs)
        assert not torch.allclose(theirs, our_model(cfg, state)(x), atol=1e-3)  # the adapters do something

    # Import back: same config, same tensors.
    back_cfg, back = load_peft_adapter(adapter_dir, cfg)
    assert back_cfg == lora_cfg
    assert back.keys() == adapters.keys() and all(torch.equal(back[k], adapters[k]) for k in adapters)


def test_merged_export_loads_in_transformers_with_adapter_logits(tmp_path, base_folder):
    lora_cfg = LORA_CASES["rslora-subset"]
    cfg, state = load_hf_model(base_folder)
    ours = lora_model(cfg, state, lora_cfg)
    export_merged(tmp_path / "merged", cfg, state, lora_state_dict(ours), lora_cfg)
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    x = tokens()
    with torch.no_grad():
        assert_close(merged(x).logits, ours(x))
    # Untouched weights are copied bit for bit.
    _, merged_state = load_hf_model(tmp_path / "merged")
    assert torch.equal(merged_state["model.layers.0.self_attn.k_proj.weight"],
                       state["model.layers.0.self_attn.k_proj.weight"])
    assert not torch.equal(merged_state["model.layers.0.self_attn.q_proj.weight"],
                           state["model.layers.0.self_attn.q_proj.weight"])


def test_peft_written_adapters_import(tmp_path, base_folder):
    """The other direction: an adapter PEFT itself trained and saved loads into our model with equal logits."""
    cfg, state = load_hf_model(base_folder)
    base = transformers.LlamaForCausalLM.from_pretrained(base_folder)
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["k_proj", "o_proj", "up_proj"], task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(base, config)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "peft")
    lora_cfg, adapters = load_peft_adapter(tmp_path / "peft", cfg)
    assert (lora_cfg.r, lora_cfg.alpha, set(lora_cfg.targets)) == (4, 12, {"k_proj", "o_proj", "up_proj"})
    ours = apply_lora(our_model(cfg, state), lora_cfg)
    ours.load_state_dict(adapters, strict=False)
    x = tokens()
    with torch.no_grad():
        assert_close(ours.eval()(x), peft_model.eval()(input_ids=x).logits)


def test_bad_folders_give_clear_errors(tmp_path, base_folder):
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(gpt2)
    with pytest.raises(ValueError, match=r"gpt2/config.json: model_type='gpt2' is unsupported: supported families"):
        load_hf_model(gpt2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_model(tmp_path / "nowhere")
    raw = json.loads((base_folder / "config.json").read_text())
    edits = {
        "rope": ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
                 "cannot read this config.*Missing required keys.*'llama3'"),
        "rope5": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_type='yarn'"),
        "mlp_bias": ({"mlp_bias": True}, "mlp_bias=True is unsupported"),
        "act": ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        "arch": ({"architectures": ["MistralForCausalLM"]}, "a llama causal LM is LlamaForCausalLM"),
        "gqa": ({"num_key_value_heads": 3}, "not a multiple of model.n_kv_heads"),
    }
    for name, (edit, message) in edits.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**raw, **edit}))
        (folder / "model.safetensors").write_bytes((base_folder / "model.safetensors").read_bytes())
        with pytest.raises(ValueError, match=message):
            load_hf_model(folder)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(raw))
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_hf_model(pickled)


def test_bad_adapters_give_clear_errors(tmp_path, base_folder):
    cfg, state = load_hf_model(base_folder)
    lora_cfg = LoraConfig(r=4, targets=("q_proj", "down_proj"))
    adapter_dir = save_peft_adapter(tmp_path / "a", cfg, lora_cfg, lora_state_dict(lora_model(cfg, state, lora_cfg)))
    narrower = ModelConfig(vocab_size=259, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)
    shapes = r"q_proj.lora_A.weight has shape \(4, 64\) but the base model needs \(4, 32\)"
    with pytest.raises(ValueError, match=shapes):
        load_peft_adapter(adapter_dir, narrower)
    raw = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    for edit, message in [({"peft_type": "IA3"}, "peft_type='IA3'"), ({"use_dora": True}, "DoRA"),
                          ({"target_modules": "all-linear"}, "explicit list"), ({"r": 0}, "lora.r=0")]:
        (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps({**raw, **edit}))
        with pytest.raises(ValueError, match=message):
            load_peft_adapter(adapter_dir, cfg)
    (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps(raw))
    (adapter_dir / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors does not exist"):
        load_peft_adapter(adapter_dir, cfg)
    with pytest.raises(ValueError, match="missing"):
        save_peft_adapter(tmp_path / "b", cfg, LoraConfig(r=4), {})
    base_copy = copy.deepcopy(state)
    del base_copy["lm_head.weight"]
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
        save_hf_model(tmp_path / "c", cfg, base_copy)


def test_every_key_of_pefts_lora_config_is_judged():
    """A key PEFT adds later must be classified (refused, or harmless) before an adapter using it loads."""
    import dataclasses

    from elastic.model import peft_io

    judged = set(peft_io._MUST_BE) | set(peft_io._MUST_BE_EMPTY) | set(peft_io._HARMLESS)
    keys = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert keys <= judged, f"PEFT LoraConfig keys nobody judged: {sorted(keys - judged)}"


def test_alora_adapter_is_refused(tmp_path, base_folder):
    cfg, state = load_hf_model(base_folder)
    lora_cfg = LoraConfig(r=4, targets=("q_proj",))
    adapter_dir = save_peft_adapter(tmp_path / "a", cfg, lora_cfg, lora_state_dict(lora_model(cfg, state, lora_cfg)))
    raw = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps({**raw, "alora_invocation_tokens": [5, 6]}))
    with pytest.raises(ValueError, match=r"alora_invocation_tokens=\[5, 6\]: an aLoRA adapter applies only after"):
        load_peft_adapter(adapter_dir, cfg)
