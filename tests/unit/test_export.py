"""A run's outputs load where users load models (``model/export.py``), built in-process without workers.

From a random Qwen2 folder (with a tokenizer and chat template) and a run state with non-zero adapters:
``AutoPeftModelForCausalLM.from_pretrained(RUN_DIR/adapter)`` finds its base by itself (from another
working directory) and computes our logits; ``lora.export = "both"`` also writes a merged folder that
``AutoModelForCausalLM`` loads with the same logits; a full fine-tune writes an HF folder likewise. Each
folder carries the base's tokenizer.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers

from elastic.core.config import Config, DataConfig, LoraConfig, TrainConfig
from elastic.model.export import base_model_name, export_model, how_to_sample
from elastic.model.hf import load_hf_model, model_config_of
from elastic.model.llama import LlamaStage
from elastic.model.lora import apply_lora
from elastic.tools.tiny_hf import write_model, write_tokenizer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2")
    write_model(folder, "qwen2", tie_word_embeddings=False)
    write_tokenizer(folder)
    return folder


def run_state(cfg: Config, seed: int = 1) -> tuple[dict[str, torch.Tensor], LlamaStage]:
    """A run's full state (with an optimizer entry) whose adapters (or, without LoRA, weights) moved; our model."""
    _, state = load_hf_model(cfg.train.init_from)
    model = LlamaStage(cfg.model)
    model.load_state_dict(state)
    if cfg.lora is not None:
        apply_lora(model, cfg.lora, seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name or cfg.lora is None:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tensors["model.norm.weight::exp_avg"] = torch.zeros_like(tensors["model.norm.weight"])  # dropped on export
    return tensors, model.eval()


def config(base, lora: LoraConfig | None) -> Config:
    return Config(model=model_config_of(base), lora=lora, data=DataConfig(dataset="arithmetic", seq_len=16),
                  train=TrainConfig(steps=1, global_batch=2, init_from=str(base)))


def logits_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    assert err <= 1e-5, err


X = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(5))


def test_adapter_and_merged_load_with_our_logits(tmp_path, base, monkeypatch):
    cfg = config(base, LoraConfig(r=4, alpha=8.0, export="both"))
    tensors, ours = run_state(cfg)
    written = export_model(tmp_path / "run", cfg, tensors)
    assert set(written) == {"adapter", "merged"}
    adapter_cfg = json.loads((written["adapter"] / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(base.resolve())
    monkeypatch.chdir(tmp_path)  # the adapter names its base absolutely: no working directory needed
    with torch.no_grad():
        expected = ours(X)
        auto = peft.AutoPeftModelForCausalLM.from_pretrained(str(written["adapter"])).eval()
        logits_close(expected, auto(input_ids=X).logits)
        merged = transformers.AutoModelForCausalLM.from_pretrained(str(written["merged"])).eval()
        logits_close(expected, merged(input_ids=X).logits)
    for folder in written.values():  # each carries the base's tokenizer and chat template
        assert transformers.AutoTokenizer.from_pretrained(str(folder)).chat_template
    lines = how_to_sample(written, str(base))
    assert any(line.startswith(f"sample from it: elastic generate --base {written['merged']}") for line in lines)


def test_full_fine_tune_writes_an_hf_folder_with_our_logits(tmp_path, base):
    cfg = config(base, None)
    tensors, ours = run_state(cfg)
    written = export_model(tmp_path / "run", cfg, tensors)
    assert list(written) == ["model"]
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(written["model"])).eval()(input_ids=X).logits
        logits_close(ours(X), theirs)
    assert (written["model"] / "tokenizer.json").is_file()
    # The command line's full fine-tune: pretrain --base FOLDER --data FILE (no adapters, the folder's weights).
    from elastic.recipes.pretrain.recipe import finetune_config

    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": "def f(): return 1"}) + "\n")
    tuned = finetune_config(base, str(data))
    assert (tuned.lora, tuned.train.init_from, tuned.data.dataset) == (None, str(base), str(data))
    with pytest.raises(ValueError, match="give --data FILE"):
        finetune_config(base, None)


def test_a_random_base_is_written_for_the_adapter_and_names_are_kept(tmp_path, base):
    cfg = config(base, LoraConfig(r=4, alpha=8.0))
    tensors, _ = run_state(cfg)
    cfg = cfg.replace(train=TrainConfig(steps=1, global_batch=2, init_from=""))  # as GRPO's toy preset runs
    written = export_model(tmp_path / "run", cfg, tensors)
    assert set(written) == {"base", "adapter"}
    named = json.loads((written["adapter"] / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == str(written["base"].resolve())
    peft.AutoPeftModelForCausalLM.from_pretrained(str(written["adapter"]))  # loads
    assert base_model_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"  # a hub id stays as given
    with pytest.raises(ValueError, match="lora.export='merge'"):
        LoraConfig(export="merge")
