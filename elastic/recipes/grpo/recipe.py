"""GRPO recipe: the config of an RL run, on the built-in arithmetic task (with simulated reward noise)
or on a file of users' prompts with TRL-style reward functions.

The loop runs under the controller with ``GRPOWorkload`` (``workload.py``), e.g.
``elastic.control.run.run_job(cfg, options, GRPOWorkload(cfg))``.
"""

from __future__ import annotations

from pathlib import Path

from elastic.core.config import MODEL_PRESETS, Config, DataConfig, LoraConfig, OptimConfig, RuntimeConfig, TrainConfig
from elastic.model.hf import model_config_of, tokenizer_of_folder
from elastic.recipes.grpo.config import GRPOConfig


def grpo_config(base: str | Path | None = None, steps: int = 30, workers: int = 4, prompts_per_step: int = 8,
                lr: float = 1e-3, lora: bool = True, dtype: str = "float32", seed: int = 0,
                data: str | None = None, **grpo) -> Config:
    """GRPO. ``base``: a Hugging Face folder (e.g. SFT-warmed), with its own tokenizer if it has one; None: a
    random 'mini' model. ``data``: a prompt file (TRL's prompt-only format; name ``reward_funcs``); None: the
    built-in arithmetic task."""
    if data:  # by default the exact-match accuracy on the file's 'answer' column (--grpo.reward_funcs replaces it)
        grpo = {"prompts": str(data), "inject_noise": False, **grpo}
    g = GRPOConfig(**{"num_generations": 8, "max_new_tokens": 6, "temperature": 1.0, "loss_type": "dapo", **grpo})
    if base is not None:
        model = model_config_of(base)
        tokenizer = tokenizer_of_folder(base, model)
    else:
        model, tokenizer = MODEL_PRESETS["mini"], ""
    return Config(model=model, sections={"grpo": g}, lora=LoraConfig(r=16, alpha=32.0) if lora else None,
                  data=DataConfig(dataset="arithmetic", seq_len=max(17, 12 + g.max_new_tokens), num_samples=50_000,
                                  tokenizer=tokenizer),
                  train=TrainConfig(steps=steps * g.num_iterations, global_batch=prompts_per_step, dtype=dtype,
                                    seed=seed, init_from=str(base) if base else ""),
                  optim=OptimConfig(lr=lr, warmup_steps=0, weight_decay=0.0, grad_clip=1.0),
                  runtime=RuntimeConfig(workers=workers))
