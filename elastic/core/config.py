"""Configuration: one frozen dataclass per component, validated when it is built.

Every field carries its help text in ``metadata["help"]`` so that the CLI can expose the
same fields with the same documentation. Errors raise ``ValueError`` naming the field, the
rule and the fix, before any process starts.

The core sections (model, optim, data, train, runtime, and the LoRA model transform) are defined
here. A recipe that needs a section of its own (GRPO's ``[grpo]``) defines it in its own folder and
calls ``register_section`` when that module is imported: this module imports no recipe, and a
``Config`` carries recipe sections in ``Config.sections``. The controller's ``[control]`` section registers
itself the same way (``elastic/control/config.py``). Pure Python.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

DTYPES = ("float32", "float64", "bfloat16")
MIXED_PRECISION = ("no", "bf16")


def knob(default: Any, help: str) -> Any:
    """A dataclass field with a default and a help text (shown by ``elastic train --help``)."""
    return field(default=default, metadata={"help": help})


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the decoder (names follow Hugging Face's LlamaConfig).

    One decoder computes the Llama, Qwen2, Qwen3 and Mistral families; the family flags below say which
    of their differences are switched on (``elastic.model.families`` maps a ``config.json`` to them).
    """

    vocab_size: int = knob(259, "vocabulary size; the byte tokenizer needs 259 (256 bytes + 3 specials)")
    dim: int = knob(64, "hidden size (HF: hidden_size)")
    n_layers: int = knob(2, "number of decoder layers (HF: num_hidden_layers)")
    n_heads: int = knob(4, "attention heads (HF: num_attention_heads)")
    n_kv_heads: int = knob(2, "key/value heads for grouped-query attention (HF: num_key_value_heads)")
    ffn_dim: int = knob(128, "SwiGLU inner width (HF: intermediate_size)")
    max_seq_len: int = knob(256, "longest sequence RoPE is prepared for (HF: max_position_embeddings)")
    rope_theta: float = knob(10000.0, "RoPE base frequency")
    norm_eps: float = knob(1e-6, "RMSNorm epsilon (HF: rms_norm_eps)")
    init_std: float = knob(0.02, "standard deviation of the normal weight init")
    family: str = knob("llama", "model family, as HF's model_type: llama, qwen2, qwen3 or mistral")
    head_size: int = knob(0, "width of one attention head (HF: head_dim); 0: dim / n_heads")
    qkv_bias: bool = knob(False, "q/k/v projections have biases (Qwen2; HF attention_bias sets it too)")
    o_bias: bool = knob(False, "the attention output projection has a bias (HF attention_bias)")
    qk_norm: bool = knob(False, "RMSNorm on each query and key head before RoPE (Qwen3's q_norm/k_norm)")
    tie_embeddings: bool = knob(False, "the LM head is the embedding matrix (HF tie_word_embeddings)")
    rope_type: str = knob("default", "RoPE frequencies: default, or llama3 (Llama 3.1's scaled frequencies)")
    rope_factor: float = knob(8.0, "llama3 RoPE: scaling factor")
    rope_low_freq_factor: float = knob(1.0, "llama3 RoPE: low_freq_factor")
    rope_high_freq_factor: float = knob(4.0, "llama3 RoPE: high_freq_factor")
    rope_original_max_len: int = knob(8192, "llama3 RoPE: original_max_position_embeddings")
    sliding_window: int = knob(0, "Mistral's attention window (0: none); runs must fit their sequences in it")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, f"model.{name}={value!r} must be a positive integer")
        _require(isinstance(self.head_size, int) and self.head_size >= 0,
                 f"model.head_size={self.head_size!r} must be 0 (dim / n_heads) or a positive integer")
        _require(
            self.head_size > 0 or self.dim % self.n_heads == 0,
            f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads} "
            f"({self.dim} % {self.n_heads} = {self.dim % self.n_heads}); pick a dim that is a multiple of n_heads",
        )
        _require(
            self.n_heads % self.n_kv_heads == 0,
            f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}; "
            "grouped-query attention shares each kv head among n_heads/n_kv_heads query heads",
        )
        _require(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        _require(self.family in FAMILIES, f"model.family={self.family!r} is not one of {FAMILIES}")
        _require(self.rope_type in ROPE_TYPES, f"model.rope_type={self.rope_type!r} is not one of {ROPE_TYPES}")

    @property
    def head_dim(self) -> int:
        return self.head_size or self.dim // self.n_heads

    def num_params(self) -> int:
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attn = self.dim * (2 * q + 2 * kv) + self.qkv_bias * (q + 2 * kv) + self.o_bias * self.dim
        attn += 2 * self.head_dim * self.qk_norm
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        return self.n_layers * per_layer + (1 + (not self.tie_embeddings)) * self.vocab_size * self.dim + self.dim


FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
ROPE_TYPES = ("default", "llama3")


MODEL_PRESETS: dict[str, ModelConfig] = {
    # ~0.1M parameters: unit and equivalence tests.
    "tiny": ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=128),
    # ~1M parameters: integration tests and quick demos.
    "mini": ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, max_seq_len=256),
    # ~8M parameters: the main demo (learns readable Python-ish text in minutes on 2 cores).
    "small": ModelConfig(dim=256, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=768, max_seq_len=256),
    # ~25M parameters: throughput and recovery benchmarks.
    "25m": ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1408, max_seq_len=512),
    # ~100M parameters: reshard and LoRA benchmarks.
    "100m": ModelConfig(dim=768, n_layers=14, n_heads=12, n_kv_heads=4, ffn_dim=2560, max_seq_len=512),
}


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with gradient clipping and a warmup + cosine learning-rate schedule."""

    lr: float = knob(3e-3, "peak learning rate")
    min_lr_ratio: float = knob(0.1, "final learning rate as a fraction of the peak (cosine floor)")
    warmup_steps: int = knob(10, "linear warmup steps from 0 to the peak")
    weight_decay: float = knob(0.01, "AdamW decoupled weight decay (not applied to norm weights)")
    beta1: float = knob(0.9, "AdamW beta1")
    beta2: float = knob(0.95, "AdamW beta2")
    eps: float = knob(1e-8, "AdamW epsilon")
    grad_clip: float = knob(1.0, "clip the global gradient norm to this value; 0 disables clipping")

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"optim.lr={self.lr} must be > 0")
        _require(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        _require(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1 and optim.beta2 must lie in [0, 1)")
        _require(self.eps > 0, f"optim.eps={self.eps} must be > 0")
        _require(self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip} must be >= 0 (0 disables)")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, and how samples are cut."""

    dataset: str = knob(
        "stdlib",
        "'stdlib' (Python's own source files), 'arithmetic' (exact-answer sums), "
        "or a path to a .txt file or a .json/.jsonl/.parquet file in a TRL format (text, prompt+completion, messages)",
    )
    tokenizer: str = knob("", "model folder whose tokenizer (and chat template) encodes the data; empty: bytes")
    seq_len: int = knob(64, "tokens per training sample (inputs; targets are shifted by one)")
    max_corpus_bytes: int = knob(4_000_000, "cap on the text corpus size read from disk")
    eval_fraction: float = knob(0.02, "fraction of the data file's rows (or text windows) held out of training "
                                "for evaluation; ignored when eval_data is set")
    eval_data: str = knob("", "a .txt/.json/.jsonl/.parquet file whose rows are the held-out set (train.eval_every); "
                          "the training data is then used whole")
    num_samples: int = knob(100_000, "size of a synthetic task's training set")

    def __post_init__(self) -> None:
        _require(self.seq_len >= 2, f"data.seq_len={self.seq_len} must be >= 2")
        _require(self.max_corpus_bytes > 0, f"data.max_corpus_bytes={self.max_corpus_bytes} must be > 0")
        _require(0 <= self.eval_fraction < 1, f"data.eval_fraction={self.eval_fraction} must be in [0, 1)")
        _require(self.num_samples > 0, f"data.num_samples={self.num_samples} must be > 0")


@dataclass(frozen=True)
class TrainConfig:
    """The run: how long, how big a batch, which precision, which seed."""

    steps: int = knob(100, "optimizer steps to run")
    init_from: str = knob("", "Hugging Face Llama folder with the starting weights; empty: random init from the seed")
    global_batch: int = knob(16, "sequences per optimizer step, fixed whatever the layout")
    dtype: str = knob("float32", "parameter and compute dtype: float32, float64 (exactness tests) or bfloat16 "
                      "(pure bf16: bf16 weights and AdamW moments too; see mixed_precision)")
    mixed_precision: str = knob("no", "'bf16': forward and backward in bf16 (torch.autocast) over float32 weights, "
                                "gradients, reductions and AdamW moments (TRL's bf16: true); 'no': compute in dtype")
    frozen_bf16: bool = knob(True, "under mixed_precision='bf16', store the frozen base's matmul weights (LoRA) in "
                             "bf16, the rounding autocast applies before every matmul anyway: same values, half "
                             "the bytes; false keeps them float32")
    vocab_parallel: bool = knob(True, "under fsdp, keep the embedding and LM head in their shards of vocabulary rows "
                                "and compute the lookup, logits and loss there (Megatron's vocab parallelism) instead "
                                "of gathering them whole on every worker; false: FSDP gathers them")
    seed: int = knob(0, "one seed for model init, data order and sampling")
    activation_checkpointing: bool = knob(False, "recompute each decoder layer's activations in backward instead "
                                          "of keeping them (less memory, one more forward; same weights)")
    eval_every: int = knob(0, "evaluate on the held-out rows every this many optimizer steps (eval_loss in "
                           "metrics.jsonl, TRL's eval_steps); 0: never")

    def __post_init__(self) -> None:
        _require(self.steps >= 0, f"train.steps={self.steps} must be >= 0")
        _require(self.eval_every >= 0, f"train.eval_every={self.eval_every} must be >= 0 (0: no evaluation)")
        _require(self.global_batch >= 1, f"train.global_batch={self.global_batch} must be >= 1")
        _require(self.dtype in DTYPES, f"train.dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        _require(self.mixed_precision in MIXED_PRECISION,
                 f"train.mixed_precision={self.mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)} "
                 "(fp16 is not implemented: these workers are CPUs, whose half type is bf16)")
        _require(self.mixed_precision == "no" or self.dtype == "float32",
                 f"train.mixed_precision={self.mixed_precision!r} keeps float32 master weights and computes in bf16, "
                 f"so it needs train.dtype='float32', not {self.dtype!r}; drop train.dtype (TRL's dtype/torch_dtype), "
                 "or drop mixed_precision (TRL's bf16) for pure bf16")


@dataclass(frozen=True)
class RuntimeConfig:
    """Processes, CPUs and timeouts."""

    workers: int = knob(4, "number of worker processes (Ray actors)")
    cpus_per_worker: float = knob(0.25, "Ray CPU reservation per worker; fractional so 4-8 fit on 2 cores")
    threads_per_worker: int = knob(1, "torch intra-op threads per worker")
    collective_timeout_s: float = knob(3600.0, "gloo's own timeout, a backstop only: the driver finds dead and hung "
                                       "workers itself (deadline_*), so this ends a wait only if the driver is gone")
    store_timeout_s: float = knob(300.0, "how long a worker waits for its peers to join a group (a rendezvous whose "
                                  "member died is called off at once)")
    deadline_factor: float = knob(4.0, "the driver probes workers that have not answered a call after this many "
                                  "times the slowest recent call of its kind (a probe ends nothing by itself)")
    deadline_floor_s: float = knob(60.0, "never probe sooner than this after a call started")
    ping_timeout_s: float = knob(10.0, "a worker whose control thread does not answer a probe within this is hung "
                                 "(a live process answers in milliseconds, whatever its compute thread does)")
    warmup_retries: int = knob(3, "failed worker warm-ups to replace before the job gives up on starting workers")
    warmup_backoff_s: float = knob(2.0, "wait before the first retried warm-up; it doubles with each failure")
    reshard_chunk_bytes: int = knob(64 << 20, "largest single reshard message; bigger pieces are split")
    reshard_round_bytes: int = knob(256 << 20, "bytes a worker may send plus receive in one reshard round")
    reshard_pack_bytes: int = knob(1 << 20, "reshard pieces smaller than this travel packed, one message per "
                                   "peer and round (0: every piece alone)")
    skeletons: int = knob(6, "placements whose engine skeletons (structure and groups, no storage) a worker keeps "
                          "for reuse: the next one, the fallback for a lost worker, recent ones (0: none)")
    base_from: str = knob("auto", "where a reshard takes a LoRA run's frozen base pieces from when train.init_from "
                          "names its folder: auto (the cost model's faster of the two), peer, or disk")
    memory_per_worker_gb: float = knob(
        0.0, "policy: skip layouts whose predicted peak per worker above its idle process (state, gradients, "
        "FSDP gathers, activations, logits, a reshard's staged copy; plan/memory.py) exceeds this many GB; "
        "0: four fifths of the memory Ray found on the worker's node, shared by the job's workers there")
    malloc_mmap_threshold: int = knob(1 << 20, "a worker's glibc mmap threshold in bytes (mallopt, fixed when it "
                                      "builds an engine): larger allocations go back to the OS when freed instead "
                                      "of staying in glibc's heap (runtime/heap.py); 0: glibc's dynamic default")

    def __post_init__(self) -> None:
        _require(self.malloc_mmap_threshold >= 0,
                 f"runtime.malloc_mmap_threshold={self.malloc_mmap_threshold} must be >= 0 (0: glibc's default)")
        _require(self.workers >= 1, f"runtime.workers={self.workers} must be >= 1")
        _require(self.cpus_per_worker > 0, f"runtime.cpus_per_worker={self.cpus_per_worker} must be > 0")
        _require(self.threads_per_worker >= 1, f"runtime.threads_per_worker={self.threads_per_worker} must be >= 1")
        for name in ("collective_timeout_s", "store_timeout_s", "deadline_floor_s", "ping_timeout_s"):
            _require(getattr(self, name) > 0, f"runtime.{name}={getattr(self, name)} must be > 0")
        _require(self.deadline_factor >= 1, f"runtime.deadline_factor={self.deadline_factor} must be >= 1")
        _require(self.warmup_retries >= 0 and self.warmup_backoff_s >= 0,
                 "runtime.warmup_retries and runtime.warmup_backoff_s must be >= 0")
        _require(self.reshard_chunk_bytes > 0 and self.reshard_round_bytes > 0, "reshard byte budgets must be > 0")
        _require(self.reshard_pack_bytes >= 0, "runtime.reshard_pack_bytes must be >= 0 (0: no packing)")
        _require(self.base_from in ("auto", "peer", "disk"),
                 f"runtime.base_from={self.base_from!r} must be one of auto, peer, disk")
        _require(self.skeletons >= 0, f"runtime.skeletons={self.skeletons} must be >= 0 (0: keep none)")
        _require(self.memory_per_worker_gb >= 0, f"runtime.memory_per_worker_gb={self.memory_per_worker_gb} "
                 "must be >= 0 (0: from the memory Ray reports per node)")


DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters: which linears get them, their rank and scaling (PEFT's LoraConfig subset)."""

    r: int = knob(8, "adapter rank: A is [r, in_features], B is [out_features, r] (PEFT: r)")
    alpha: float = knob(16.0, "scaling numerator: the update is (alpha / r) * B @ A (PEFT: lora_alpha)")
    dropout: float = knob(0.0, "dropout on the adapter's input in training steps, in [0, 1) (PEFT: lora_dropout); "
                               "masks are seeded by (seed, step, sample, module), so every layout and every replay "
                               "draws the same ones; evaluation, sampling and GRPO's old/reference log-probs have none")
    targets: tuple[str, ...] = knob(
        DEFAULT_LORA_TARGETS,
        "linear layers that get adapters, matched by module name suffix, e.g. q_proj or self_attn.q_proj "
        "(PEFT: target_modules)",
    )
    use_rslora: bool = knob(False, "rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r")
    export: str = knob("adapter", "what the run writes at its end: 'adapter' (RUN_DIR/adapter, a PEFT folder), "
                                  "'merged' (RUN_DIR/merged, a plain HF folder with the adapter folded in) or 'both'")

    def __post_init__(self) -> None:
        _require(
            isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0,
            f"lora.r={self.r!r} must be a positive integer (the adapter rank); typical values are 4 to 64",
        )
        _require(
            isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and self.alpha > 0,
            f"lora.alpha={self.alpha!r} must be a finite number > 0; a common choice is 2 * r",
        )
        _require(0 <= self.dropout < 1, f"lora.dropout={self.dropout!r} must lie in [0, 1); use 0 to disable it")
        # A bare string would iterate as characters; lists (from JSON/TOML) become tuples.
        _require(
            not isinstance(self.targets, str),
            f"lora.targets={self.targets!r} must be a list of module names, e.g. ({self.targets!r},)",
        )
        targets = tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        _require(len(targets) > 0,
                 f"lora.targets is empty; name at least one linear layer, e.g. {DEFAULT_LORA_TARGETS}")
        bad = [t for t in targets if not isinstance(t, str) or not t or t.startswith(".") or t.endswith(".")]
        _require(not bad, f"lora.targets has invalid entries {bad}; use module names such as 'q_proj'")
        dupes = sorted({t for t in targets if targets.count(t) > 1})
        _require(not dupes, f"lora.targets lists {dupes} more than once; list each module once")
        _require(self.export in ("adapter", "merged", "both"),
                 f"lora.export={self.export!r} must be 'adapter', 'merged' or 'both'")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


CORE_SECTIONS: dict[str, type] = {"model": ModelConfig, "optim": OptimConfig, "data": DataConfig,
                                  "train": TrainConfig, "runtime": RuntimeConfig, "lora": LoraConfig}
_RECIPE_SECTIONS: dict[str, type] = {}
S = TypeVar("S", bound=type)


def register_section(name: str, cls: S) -> S:
    """Make ``cls`` the dataclass of config section ``[name]``; recipes call this when their config
    module is imported, so the base config never imports a recipe. Returns ``cls``."""
    _require(name not in CORE_SECTIONS, f"config section [{name}] is a core section; a recipe cannot redefine it")
    known = _RECIPE_SECTIONS.get(name)
    _require(known in (None, cls), f"config section [{name}] is registered twice: by {known} and by {cls}")
    _RECIPE_SECTIONS[name] = cls
    return cls


def section_types() -> dict[str, type]:
    """Every section a Config may hold: the core ones, then those the imported recipes registered."""
    return {**CORE_SECTIONS, **_RECIPE_SECTIONS}


@dataclass(frozen=True)
class Config:
    """Everything a run needs. Recipes are functions that return one of these."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    lora: LoraConfig | None = None  # LoRA fine-tuning: adapters train, the base is frozen
    sections: dict[str, Any] = field(default_factory=dict)  # recipe sections by name (see register_section)

    def __post_init__(self) -> None:
        _require(
            self.data.seq_len <= self.model.max_seq_len,
            f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
            "shorten the samples or raise max_seq_len",
        )
        window = self.model.sliding_window
        _require(
            not window or self.data.seq_len <= window,
            f"data.seq_len={self.data.seq_len} exceeds the model's sliding_window={window}: our decoder attends to "
            "every earlier position, which equals sliding-window attention only within the window; "
            f"use data.seq_len <= {window}",
        )
        for name, value in self.sections.items():
            cls = _RECIPE_SECTIONS.get(name)
            _require(cls is not None, f"config section [{name}] is not registered by any imported module; "
                                      f"known registered sections: {sorted(_RECIPE_SECTIONS)}")
            _require(isinstance(value, cls), f"config section [{name}] must be a {cls.__name__}, "
                                             f"got {type(value).__name__}")

    def section(self, name: str) -> Any:
        """The recipe section ``[name]``, or None when this run has none."""
        return self.sections.get(name)

    def replace(self, **changes: Any) -> Config:
        """A copy with whole sections replaced, e.g. ``cfg.replace(train=...)`` or ``cfg.replace(grpo=...)``
        (a recipe section; None removes it)."""
        core = {k: v for k, v in changes.items() if k in CORE_SECTIONS}
        extra = {k: v for k, v in changes.items() if k not in CORE_SECTIONS}
        sections = dict(self.sections)
        for name, value in extra.items():
            _require(name in _RECIPE_SECTIONS, f"unknown config section {name!r}; known: {sorted(section_types())}")
            if value is None:
                sections.pop(name, None)
            else:
                sections[name] = value
        return dataclasses.replace(self, **core, sections=sections)

    def to_dict(self) -> dict[str, Any]:
        """Every section as a plain dict, recipe sections beside the core ones (TOML's shape)."""
        out = {name: (None if getattr(self, name) is None else dataclasses.asdict(getattr(self, name)))
               for name in CORE_SECTIONS}
        out.update({name: dataclasses.asdict(value) for name, value in self.sections.items()})
        return out

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> Config:
        types = section_types()
        unknown = set(raw) - set(types)
        _require(not unknown, f"unknown config sections {sorted(unknown)}; expected {sorted(types)}")
        built, sections = {}, {}
        for name, cls in types.items():
            if raw.get(name) is None:
                continue
            values = dict(raw[name])
            known = {f.name for f in dataclasses.fields(cls)}
            bad = set(values) - known
            _require(not bad, f"unknown fields {sorted(bad)} in config section [{name}]; known: {sorted(known)}")
            (built if name in CORE_SECTIONS else sections)[name] = cls(**values)
        return Config(**built, sections=sections)
