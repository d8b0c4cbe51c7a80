"""GRPO recipe: the config of a noisy-reward RL run on the built-in arithmetic task.

The loop runs under the controller with ``GRPOWorkload`` (``workload.py``), e.g.
``elastic.control.run.run_job(cfg, options, GRPOWorkload(cfg))``.
"""

from __future__ import annotations

from pathlib import Path

from elastic.core.config import MODEL_PRESETS, Config, DataConfig, LoraConfig, OptimConfig, RuntimeConfig, TrainConfig
from elastic.core.tokenizer import VOCAB_SIZE
from elastic.model.hf import model_config_of
from elastic.recipes.grpo.config import GRPOConfig


def grpo_config(base: str | Path | None = None, steps: int = 30, workers: int = 4, prompts_per_step: int = 8,
                lr: float = 1e-3, lora: bool = True, dtype: str = "float32", seed: int = 0, **grpo) -> Config:
    """GRPO on arithmetic. ``base``: an HF Llama folder (e.g. SFT-warmed); None: a random 'mini' model."""
    g = GRPOConfig(**{"num_generations": 8, "max_new_tokens": 6, "temperature": 1.0, "loss_type": "dapo", **grpo})
    if base is not None:
        model = model_config_of(base)
        if model.vocab_size != VOCAB_SIZE:
            raise ValueError(f"{base}: vocab_size={model.vocab_size}; the grpo recipe samples and scores with the "
                             f"byte tokenizer ({VOCAB_SIZE} tokens) for now, so it needs one of our byte-level "
                             "models (examples/pretrain.py --save); use the lora recipe for this folder")
    else:
        model = MODEL_PRESETS["mini"]
    return Config(model=model, sections={"grpo": g}, lora=LoraConfig(r=16, alpha=32.0) if lora else None,
                  data=DataConfig(dataset="arithmetic", seq_len=max(12, 7 + g.max_new_tokens), num_samples=50_000),
                  train=TrainConfig(steps=steps * g.num_iterations, global_batch=prompts_per_step, dtype=dtype,
                                    seed=seed, init_from=str(base) if base else ""),
                  optim=OptimConfig(lr=lr, warmup_steps=0, weight_decay=0.0, grad_clip=1.0),
                  runtime=RuntimeConfig(workers=workers))
