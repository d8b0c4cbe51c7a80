"""LoRA fine-tuning recipe: a base model from a Hugging Face folder, adapters on a user's data file with
real-model defaults (TRL's and PEFT's) or on the built-in arithmetic task with toy ones, and held-out
accuracy by greedy decoding (exact answers) on chosen held-out problems (after a sweep: its test split,
``sweep.heldout_split``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from elastic.core.config import Config, DataConfig, LoraConfig, OptimConfig, RuntimeConfig, TrainConfig
from elastic.core.data import ArithmeticTask
from elastic.core.tokenizer import ByteTokenizer
from elastic.model.generate import SamplingConfig, sample
from elastic.model.hf import load_hf_model, model_config_of, tokenizer_of_folder
from elastic.model.llama import LlamaStage
from elastic.model.lora import apply_lora

# Real-model defaults (a user's --data on their --base), and where each comes from (printed when a run starts).
# TRL's SFTConfig: max_length 1024, learning_rate 2e-5 (full fine-tuning), AdamW beta2 0.999, weight_decay 0;
# TRL's ModelConfig: lora_r 16, lora_alpha 32, lora_dropout 0.05; lr 2e-4 for LoRA as TRL's and PEFT's LoRA
# examples use; per_device_train_batch_size 8, each worker counted as one device. Precision stays float32 unless
# asked: TRL's bf16 (its default) is mixed precision here too (--bf16, train.mixed_precision), opt-in so far.
REAL_LR = {True: 2e-4, False: 2e-5}
REAL_WHY = {
    "optim.lr": "TRL's and PEFT's LoRA examples (full fine-tuning: TRL SFTConfig's 2e-5)",
    "data.seq_len": "TRL SFTConfig's max_length 1024, at most the model's max_position_embeddings",
    "train.global_batch": "TRL's per_device_train_batch_size 8 x the workers",
    "optim.beta2": "TRL's AdamW (adam_beta2)",
    "lora.dropout": "TRL ModelConfig's lora_dropout",
    "train.dtype": "float32; mixed precision (TRL's bf16, its default) is opt-in here: --bf16",
}


def lora_config(base: str | Path, steps: int = 200, lr: float | None = None, r: int = 16, alpha: float = 32.0,
                workers: int = 4, global_batch: int | None = None, seq_len: int = 16, dtype: str = "float32",
                seed: int = 0, data: str | None = None, real: bool = False, peft: bool = True) -> Config:
    """Fine-tune the HF folder ``base`` with LoRA (all attention and MLP projections), or fully (``peft=False``).

    ``data``: a JSON/JSONL/Parquet file in a TRL format, tokenized by the folder's own tokenizer and
    chat template; None: the built-in arithmetic task. ``real``: the real-model defaults above (what
    ``elastic train --data`` gets); else the toy ones (lr 3e-3, batch 32, sequences of up to 128 tokens).
    """
    model = model_config_of(base)
    tokenizer = tokenizer_of_folder(base, model)
    lr = lr if lr is not None else REAL_LR[peft] if real else 3e-3
    global_batch = global_batch or (8 * workers if real else 32)
    if data:
        cut = min(1024 if real else 128, model.max_seq_len)
        dataset = DataConfig(dataset=str(data), tokenizer=tokenizer, seq_len=cut)
    else:
        dataset = DataConfig(dataset="arithmetic", seq_len=seq_len, num_samples=50_000, tokenizer=tokenizer)
    adapters = LoraConfig(r=r, alpha=alpha, dropout=0.05 if real else 0.0) if peft else None
    return Config(model=model, lora=adapters, data=dataset,
                  train=TrainConfig(steps=steps, global_batch=global_batch, dtype=dtype, seed=seed,
                                    init_from=str(base)),
                  optim=OptimConfig(lr=lr, warmup_steps=max(1, steps // 20), weight_decay=0.0,
                                    beta2=0.999 if real else 0.95),
                  runtime=RuntimeConfig(workers=workers))


def model_with_adapters(cfg: Config, state: dict[str, torch.Tensor] | None = None) -> LlamaStage:
    """The base model from ``cfg.train.init_from``, plus adapters from ``state`` (a full run state) if given."""
    _, base = load_hf_model(cfg.train.init_from)
    model = LlamaStage(cfg.model)
    model.load_state_dict(base)
    if state is not None and cfg.lora is not None:
        apply_lora(model, cfg.lora)
        model.load_state_dict({k: v.float() for k, v in state.items() if "::" not in k})
    return model.float().eval()


@torch.no_grad()
def heldout_accuracy(model: LlamaStage, task: ArithmeticTask, n: int = 256, batch: int = 64,
                     indices: Sequence[int] | None = None) -> float:
    """Exact-match accuracy of greedy answers on the held-out problems ``indices`` (default: the first ``n``);
    after a learning-rate sweep, pass its test split (``sweep.heldout_split``), never the validation one."""
    tok, correct = ByteTokenizer(), 0
    indices = list(range(n)) if indices is None else list(indices)
    n = len(indices)
    for start in range(0, n, batch):
        ids = indices[start : start + batch]
        prompts = torch.tensor([task.prompt_ids(i, "holdout") for i in ids])
        out, lengths = sample(model, prompts, SamplingConfig(max_new_tokens=5, temperature=0, stop_ids=(tok.eos_id,)))
        for row, i in enumerate(ids):
            answer = tok.decode(out[row, : int(lengths[row])])
            correct += answer.strip() == task.problem(i, "holdout").answer
    return correct / n
