"""TRL's and PEFT's names for our settings: a config file's flat keys and the matching ``--flags``.

A TRL user writes ``SFTConfig`` / ``GRPOConfig`` (``TrainingArguments``) fields, TRL's ``ModelConfig``
LoRA fields (``lora_r``, ``use_peft``, ``model_name_or_path``) or PEFT's ``LoraConfig`` fields (``r``,
``target_modules``). ``translate`` turns them into our ``section.field`` overrides, in three kinds:

- ``FIELDS``: one name, one field (``learning_rate`` -> ``optim.lr``), the value converted when the
  two spell it differently (a list of reward functions is our comma-separated string);
- ``CHOICES``: names that choose the run rather than a field (``model_name_or_path`` is ``--base``);
- ``bf16: true`` is ``train.mixed_precision = "bf16"``: bf16 compute over float32 weights and AdamW state, which
  is what it means in transformers (``train.dtype = bfloat16`` is pure bf16, TRL's ``dtype: bfloat16``);
- names whose value needs the rest of the run: ``per_device_train_batch_size`` x
  ``gradient_accumulation_steps`` x the workers is our global batch (completions for GRPO, so its prompts
  per step are that over ``num_generations``), ``warmup_ratio`` is a share of the steps (``resolve``).

Names that change nothing here (logging, hub, memory-saving switches) are accepted and listed in one
line (``INERT``); some are accepted only with the value we implement (``ONLY``, e.g. ``packing: false``).
Any other name is refused, all of them named in one error. Pure Python: no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# TRL / PEFT name -> our "section.field". Where TRL's GRPOConfig and ours share a name, it is listed too.
FIELDS: dict[str, str] = {
    "learning_rate": "optim.lr", "weight_decay": "optim.weight_decay", "adam_beta1": "optim.beta1",
    "adam_beta2": "optim.beta2", "adam_epsilon": "optim.eps", "max_grad_norm": "optim.grad_clip",
    "warmup_steps": "optim.warmup_steps", "max_steps": "train.steps", "seed": "train.seed",
    "max_length": "data.seq_len", "dtype": "train.dtype", "torch_dtype": "train.dtype",
    "lora_r": "lora.r", "r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.targets", "target_modules": "lora.targets", "use_rslora": "lora.use_rslora",
    "max_completion_length": "grpo.max_new_tokens", "reward_funcs": "grpo.reward_funcs",
    **{name: f"grpo.{name}" for name in (
        "num_generations", "temperature", "top_p", "epsilon", "epsilon_high", "beta", "loss_type", "scale_rewards",
        "importance_sampling_level", "delta", "mask_truncated_completions", "top_entropy_quantile",
        "num_iterations", "sapo_temperature_pos", "sapo_temperature_neg", "reward_weights")},
    "save_steps": "control.checkpoint_every", "save_total_limit": "control.keep_checkpoints",
    "eval_steps": "train.eval_every",
}
# Names that choose the run: the command line's own options (their attribute in the parsed arguments).
CHOICES: dict[str, str] = {"model_name_or_path": "base", "dataset_name": "data", "output_dir": "run_dir",
                           "use_peft": "peft", "recipe": "recipe"}
BATCH = ("per_device_train_batch_size", "gradient_accumulation_steps")
SCHEDULES = {"cosine": 0.0, "constant_with_warmup": 1.0}  # lr_scheduler_type -> optim.min_lr_ratio
# Accepted whatever their value: they change nothing a run computes here.
INERT = frozenset((
    "report_to", "logging_steps", "logging_dir", "logging_strategy", "logging_first_step", "log_level", "run_name",
    "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "save_safetensors",
    "overwrite_output_dir", "do_train", "disable_tqdm", "dataloader_num_workers", "dataloader_pin_memory",
    "gradient_checkpointing", "gradient_checkpointing_kwargs", "remove_unused_columns", "log_completions",
    "num_completions_to_print", "ddp_find_unused_parameters", "attn_implementation", "trust_remote_code",
    "model_revision", "dataset_num_proc", "task_type", "lora_task_type", "use_liger_kernel", "tf32",
))
# Accepted only with these values (what runs here); another value is refused with the reason.
ONLY: dict[str, tuple[tuple, str]] = {
    "use_vllm": ((False,), "sampling runs in the workers' own model"),
    "packing": ((False,), "each row is one padded sequence"),
    "fp16": ((False, None), "fp16 is not implemented on these CPU workers; bf16: true is mixed precision"),
    "bias": (("none",), "LoRA adapters train no biases"),
    "use_dora": ((False,), "DoRA is not implemented"),
    "load_in_4bit": ((False,), "quantized bases are not implemented"),
    "load_in_8bit": ((False,), "quantized bases are not implemented"),
    "completion_only_loss": ((True, None), "prompt+completion rows train on the completion only"),
    "assistant_only_loss": ((True,), "conversations train on their assistant turns only"),
    "save_strategy": (("steps",), "checkpoints fall every save_steps (control.checkpoint_every; 0: none)"),
    "dataset_text_field": (("text",), "a text row's column is 'text'"),
    "eval_strategy": (("no", "steps"), "evaluation runs every eval_steps (train.eval_every; 0 or unset: none)"),
}
KNOWN = frozenset((*FIELDS, *CHOICES, *BATCH, "lr_scheduler_type", "warmup_ratio", "num_train_epochs", "bf16",
                   *INERT, *ONLY))


@dataclass
class Translation:
    """What a file's (or the flags') TRL names ask for."""

    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # section -> field -> value
    choices: dict[str, Any] = field(default_factory=dict)  # "base", "data", "run_dir", "peft", "recipe"
    inert: list[str] = field(default_factory=list)  # accepted names that change nothing here
    batch: dict[str, int] = field(default_factory=dict)  # per_device_train_batch_size, gradient_accumulation_steps
    warmup_ratio: float | None = None

    def update(self, other: Translation) -> None:
        """``other`` wins: it comes later in the precedence (flags after the file)."""
        for section, values in other.overrides.items():
            self.overrides.setdefault(section, {}).update(values)
        self.choices.update(other.choices)
        self.inert += [n for n in other.inert if n not in self.inert]
        self.batch.update(other.batch)
        self.warmup_ratio = other.warmup_ratio if other.warmup_ratio is not None else self.warmup_ratio


def _joined(value: Any) -> Any:
    """TRL's lists (reward_funcs, reward_weights) as our comma-separated strings."""
    return ",".join(str(v) for v in value) if isinstance(value, list | tuple) else value


def translate(raw: dict[str, Any], where: str) -> Translation:
    """Our overrides for a dict of TRL / PEFT names; one ValueError naming every name we do not implement."""
    out = Translation()
    unknown = sorted(k for k in raw if k not in KNOWN)
    if unknown:
        one = len(unknown) == 1
        raise ValueError(f"{where}: {', '.join(map(repr, unknown))} {'is' if one else 'are'} not implemented here "
                         "(neither a config section nor a TRL/PEFT name this project maps); remove "
                         f"{'it' if one else 'them'}, or see `elastic train --help` for the names it knows")
    steps_given = "max_steps" in raw
    for name, value in raw.items():
        if name in FIELDS:
            section, key = FIELDS[name].split(".")
            if name in ("dtype", "torch_dtype") and value == "auto":
                out.inert.append(name)
                continue
            if key == "targets" and value in ("all-linear", ("all-linear",), ["all-linear"]):
                from elastic.core.config import DEFAULT_LORA_TARGETS

                value = DEFAULT_LORA_TARGETS  # PEFT's "all-linear": every projection of a decoder layer
            out.overrides.setdefault(section, {})[key] = _joined(value) if section == "grpo" else value
        elif name in CHOICES:
            if name == "use_peft" and not isinstance(value, bool):
                raise ValueError(f"{where}: use_peft={value!r} must be true or false")
            out.choices[CHOICES[name]] = value
        elif name in BATCH:
            out.batch[name] = _positive_int(name, value, where)
        elif name == "warmup_ratio":
            out.warmup_ratio = float(value)
        elif name == "lr_scheduler_type":
            if value not in SCHEDULES:
                raise ValueError(f"{where}: lr_scheduler_type={value!r} is not implemented here: the schedule is a "
                                 "linear warmup then a cosine decay to optim.min_lr_ratio of the peak; use "
                                 f"{' or '.join(map(repr, SCHEDULES))}")
            out.overrides.setdefault("optim", {})["min_lr_ratio"] = SCHEDULES[value]
        elif name == "bf16":
            if value not in (True, False, None):
                raise ValueError(f"{where}: bf16={value!r} must be true or false")
            if value:
                out.overrides.setdefault("train", {})["mixed_precision"] = "bf16"
            else:
                out.inert.append(name)
        elif name == "num_train_epochs":
            if not steps_given:
                raise ValueError(f"{where}: num_train_epochs={value!r} is not implemented here (a run counts "
                                 "optimizer steps); give max_steps instead")
            out.inert.append(name)  # as in transformers, max_steps wins over num_train_epochs
        elif name in ONLY:
            allowed, why = ONLY[name]
            if value not in allowed:
                raise ValueError(f"{where}: {name}={value!r} is not implemented here ({why}); remove it or use "
                                 f"{allowed[0]!r}")
            out.inert.append(name)
        else:
            out.inert.append(name)
    return out


def _positive_int(name: str, value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {name}={value!r} must be a positive integer")
    return value


def batch_override(batch: dict[str, int], workers: int, num_generations: int | None) -> int:
    """Our ``train.global_batch`` for TRL's per-device batch and accumulation, each worker one device: sequences
    per step (SFT), or prompts per step (GRPO: TRL's batch counts completions, ``num_generations`` per prompt)."""
    per_device = batch.get("per_device_train_batch_size", 8)  # TRL's default
    total = per_device * batch.get("gradient_accumulation_steps", 1) * workers
    if num_generations is None:
        return total
    if total % num_generations:
        raise ValueError(f"per_device_train_batch_size {per_device} x gradient_accumulation_steps "
                         f"{batch.get('gradient_accumulation_steps', 1)} x {workers} workers = {total} completions per "
                         f"step, which is not a multiple of num_generations={num_generations} (TRL requires it too); "
                         "change one of them")
    return total // num_generations


def warmup_steps(ratio: float, steps: int) -> int:
    """TRL's (transformers') ``warmup_ratio``: ceil(ratio x steps) warmup steps."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"warmup_ratio={ratio} must lie in [0, 1]")
    return math.ceil(ratio * steps)
