"""Pre-training recipe: next-token prediction on the standard library's source code; with a Hugging Face
folder (``finetune_config``), full fine-tuning of its every weight on a user's data file."""

from __future__ import annotations

from pathlib import Path

import torch

from elastic.core.config import MODEL_PRESETS, Config, DataConfig, OptimConfig, RuntimeConfig, TrainConfig
from elastic.core.tokenizer import ByteTokenizer
from elastic.model.generate import SamplingConfig, sample
from elastic.model.hf import model_config_of, tokenizer_of_folder
from elastic.model.llama import LlamaStage


def pretrain_config(model: str = "mini", steps: int = 300, workers: int = 4, global_batch: int = 16,
                    seq_len: int = 128, lr: float = 3e-3, dtype: str = "float32", seed: int = 0) -> Config:
    return Config(
        model=MODEL_PRESETS[model],
        data=DataConfig(dataset="stdlib", seq_len=seq_len, max_corpus_bytes=4_000_000),
        train=TrainConfig(steps=steps, global_batch=global_batch, dtype=dtype, seed=seed),
        optim=OptimConfig(lr=lr, warmup_steps=max(1, steps // 20)),
        runtime=RuntimeConfig(workers=workers),
    )


# Full fine-tuning of a user's folder takes TRL SFTConfig's numbers (as the lora recipe's use_peft false does).
FINETUNE_WHY = {"optim.lr": "TRL SFTConfig's learning_rate for full fine-tuning",
                "data.seq_len": "TRL SFTConfig's max_length 1024, at most the model's max_position_embeddings",
                "train.global_batch": "TRL's per_device_train_batch_size 8 x the workers"}


def finetune_config(base: str | Path, data: str | None, steps: int = 300, workers: int = 4, lr: float = 2e-5,
                    dtype: str = "float32", seed: int = 0) -> Config:
    """Every weight of the HF folder ``base`` trained on ``data`` (a file in a TRL format, tokenized by the
    folder's tokenizer: text, prompt+completion or messages); the run writes RUN_DIR/model, an HF folder."""
    if not data:
        raise ValueError("pretrain --base FOLDER fine-tunes every weight of FOLDER on your data; give --data FILE "
                         "(a .json/.jsonl/.parquet file in a TRL format)")
    model = model_config_of(base)
    return Config(model=model,
                  data=DataConfig(dataset=str(data), tokenizer=tokenizer_of_folder(base, model),
                                  seq_len=min(1024, model.max_seq_len)),
                  train=TrainConfig(steps=steps, global_batch=8 * workers, dtype=dtype, seed=seed, init_from=str(base)),
                  optim=OptimConfig(lr=lr, warmup_steps=max(1, steps // 20), weight_decay=0.0, beta2=0.999),
                  runtime=RuntimeConfig(workers=workers))


def load_model(cfg: Config, state: dict[str, torch.Tensor]) -> LlamaStage:
    """A single-process model holding the parameters from a full state dict."""
    model = LlamaStage(cfg.model).to(state["lm_head.weight"].dtype)
    model.load_state_dict({k: v for k, v in state.items() if "::" not in k})
    return model.eval()


def complete(model: LlamaStage, prompts: list[str], max_new_tokens: int = 80, temperature: float = 0.7,
             seed: int = 0) -> list[str]:
    """Sample a continuation of each prompt (one at a time, so prompts may differ in length)."""
    tok = ByteTokenizer()
    out = []
    for i, text in enumerate(prompts):
        ids = torch.tensor([tok.encode(text, bos=True)])
        gen = torch.Generator().manual_seed(seed + i)
        tokens, length = sample(model, ids, SamplingConfig(max_new_tokens, temperature, 0.95, (tok.eos_id,)), [gen])
        out.append(text + tok.decode(tokens[0, : int(length[0])]))
    return out
