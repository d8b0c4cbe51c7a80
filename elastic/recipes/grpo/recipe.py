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

# Real-model defaults (a user's --base), and where each comes from (printed when a run starts). TRL's
# GRPOConfig: learning_rate 1e-6, num_generations 8, AdamW beta2 0.999; its max_completion_length is 512,
# halved here for CPU sampling (and kept to half the model's context); per_device_train_batch_size 8
# completions per worker, so the prompts per step are 8 x workers / num_generations. TRL's ModelConfig:
# lora_r 16, lora_alpha 32, lora_dropout 0.05. Precision stays float32 unless asked (--bf16: mixed precision).
REAL_WHY = {
    "optim.lr": "TRL GRPOConfig's learning_rate",
    "grpo.max_new_tokens": "max_completion_length 256 (TRL's default is 512; sampling on CPU)",
    "grpo.num_generations": "TRL GRPOConfig's num_generations",
    "train.global_batch": "prompts per step: TRL's per_device_train_batch_size 8 completions x the workers "
                          "/ num_generations",
    "optim.beta2": "TRL's AdamW (adam_beta2)",
    "lora.dropout": "TRL ModelConfig's lora_dropout",
    "train.dtype": "float32; mixed precision (TRL's bf16, its default) is opt-in here: --bf16",
}


def grpo_config(base: str | Path | None = None, steps: int = 30, workers: int = 4, prompts_per_step: int | None = None,
                lr: float | None = None, lora: bool = True, dtype: str = "float32", seed: int = 0,
                data: str | None = None, real: bool = False, **grpo) -> Config:
    """GRPO. ``base``: a Hugging Face folder (e.g. SFT-warmed), with its own tokenizer if it has one; None: a
    random 'mini' model. ``data``: a prompt file (TRL's prompt-only format; name ``reward_funcs``); None: the
    built-in arithmetic task. ``real``: the real-model defaults above (what ``elastic train --base`` gets);
    else the toy ones (lr 1e-3, 6 new tokens, 8 prompts per step)."""
    if data:  # by default the exact-match accuracy on the file's 'answer' column (--grpo.reward_funcs replaces it)
        grpo = {"prompts": str(data), "inject_noise": False, **grpo}
    if base is not None:
        model = model_config_of(base)
        tokenizer = tokenizer_of_folder(base, model)
    else:
        model, tokenizer = MODEL_PRESETS["mini"], ""
    new_tokens = min(256, model.max_seq_len // 2) if real else 6
    g = GRPOConfig(**{"num_generations": 8, "max_new_tokens": new_tokens, "temperature": 1.0, "loss_type": "dapo",
                      **grpo})
    if prompts_per_step is None:
        prompts_per_step = max(1, 8 * workers // g.num_generations) if real else 8
    lr = lr if lr is not None else 1e-6 if real else 1e-3
    adapters = LoraConfig(r=16, alpha=32.0, dropout=0.05 if real else 0.0) if lora else None
    return Config(model=model, sections={"grpo": g}, lora=adapters,
                  data=DataConfig(dataset="arithmetic", seq_len=min(max(17, 12 + g.max_new_tokens), model.max_seq_len),
                                  num_samples=50_000, tokenizer=tokenizer),
                  train=TrainConfig(steps=steps * g.num_iterations, global_batch=prompts_per_step, dtype=dtype,
                                    seed=seed, init_from=str(base) if base else ""),
                  optim=OptimConfig(lr=lr, warmup_steps=0, weight_decay=0.0, grad_clip=1.0,
                                    beta2=0.999 if real else 0.95),
                  runtime=RuntimeConfig(workers=workers))
