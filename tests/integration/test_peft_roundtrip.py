"""Hugging Face in, PEFT out, through real training: a tiny HF Llama folder is fine-tuned with LoRA
on two worker processes (base weights read by each rank from the folder), the adapters are
exported in PEFT's format, and ``PeftModel.from_pretrained`` on ``transformers.LlamaForCausalLM``
loads them with no missing or unexpected keys and computes our logits.
"""

from __future__ import annotations

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from elastic.core.config import Config, DataConfig, LoraConfig, OptimConfig, RuntimeConfig, TrainConfig
from elastic.core.layout import Layout, Placement
from elastic.model.hf import export_merged, load_hf_model, model_config_of
from elastic.model.llama import LlamaStage
from elastic.model.lora import apply_lora
from elastic.model.peft_io import ADAPTER_WEIGHTS, save_peft_adapter


@pytest.mark.timeout(240)
def test_train_lora_on_hf_base_then_load_with_peft(pool, tmp_path):
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      initializer_range=0.1, tie_word_embeddings=False)
    base_dir = tmp_path / "base"
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(base_dir, safe_serialization=True)
    model_cfg = model_config_of(base_dir)
    lora = LoraConfig(r=4, alpha=8.0, targets=("q_proj", "v_proj", "o_proj", "down_proj"))
    cfg = Config(model=model_cfg, lora=lora,
                 data=DataConfig(dataset="arithmetic", seq_len=16, num_samples=500),
                 train=TrainConfig(steps=6, global_batch=8, dtype="float32", init_from=str(base_dir)),
                 optim=OptimConfig(lr=2e-2, warmup_steps=0),
                 runtime=RuntimeConfig(collective_timeout_s=60))
    pool.cfg = cfg
    pool.setup(Placement(Layout(tp=2), tuple(pool.warm()[:2])))
    losses = [sum(r.loss for r in pool.step().values() if r.loss is not None) / 2 for _ in range(6)]
    assert losses[-1] < losses[0]
    _, state = pool.gather_tensors()
    adapters = {k: v for k, v in state.items() if ".lora_" in k and "::" not in k}
    base = {k: v for k, v in state.items() if ".lora_" not in k and "::" not in k}
    _, hf_state = load_hf_model(base_dir)
    assert all(torch.equal(base[k], hf_state[k]) for k in hf_state)  # the base stayed frozen

    adapter_dir = save_peft_adapter(tmp_path / "adapter", model_cfg, lora, adapters, str(base_dir))
    peft_model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base_dir),
                                                adapter_dir).eval()
    on_disk = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    assert set(peft.get_peft_model_state_dict(peft_model)) == set(on_disk)
    check = peft_model.load_adapter(adapter_dir, adapter_name="check")
    assert check.missing_keys == [] and check.unexpected_keys == []

    ours = apply_lora(LlamaStage(model_cfg), lora)
    ours.load_state_dict({**base, **adapters})
    x = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs, mine = peft_model(input_ids=x).logits, ours.eval()(x)
    err = float((mine - theirs).abs().max() / theirs.abs().max())
    assert err <= 1e-4, err

    merged_dir = export_merged(tmp_path / "merged", model_cfg, base, adapters, lora)
    with torch.no_grad():
        merged = transformers.LlamaForCausalLM.from_pretrained(merged_dir).eval()(input_ids=x).logits
    assert float((merged - theirs).abs().max() / theirs.abs().max()) <= 1e-4
