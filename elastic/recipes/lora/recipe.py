"""LoRA fine-tuning recipe: a base model from a Hugging Face Llama folder, adapters on the
built-in arithmetic task, and held-out accuracy by greedy decoding (exact answers) on chosen
held-out problems (after a sweep: its test split, ``sweep.heldout_split``).
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


def lora_config(base: str | Path, steps: int = 200, lr: float = 3e-3, r: int = 16, alpha: float = 32.0,
                workers: int = 4, global_batch: int = 32, seq_len: int = 16, dtype: str = "float32",
                seed: int = 0, data: str | None = None) -> Config:
    """Fine-tune the HF folder ``base`` with LoRA (all attention and MLP projections).

    ``data``: a JSON/JSONL/Parquet file in a TRL format, tokenized by the folder's own tokenizer and
    chat template (sequences of up to 128 tokens); None: the built-in arithmetic task.
    """
    model = model_config_of(base)
    if data:
        dataset = DataConfig(dataset=str(data), tokenizer=tokenizer_of_folder(base, model),
                             seq_len=min(128, model.max_seq_len))
    else:
        dataset = DataConfig(dataset="arithmetic", seq_len=seq_len, num_samples=50_000,
                             tokenizer=tokenizer_of_folder(base, model))
    return Config(model=model, lora=LoraConfig(r=r, alpha=alpha), data=dataset,
                  train=TrainConfig(steps=steps, global_batch=global_batch, dtype=dtype, seed=seed,
                                    init_from=str(base)),
                  optim=OptimConfig(lr=lr, warmup_steps=max(1, steps // 20), weight_decay=0.0),
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
