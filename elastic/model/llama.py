"""A compact Llama-style decoder: RMSNorm, RoPE, SwiGLU and grouped-query attention.

It computes four Hugging Face families exactly (``elastic.model.families`` reads their configs):
Llama (with Llama 3's scaled RoPE and tied embeddings, as SmolLM2), Qwen2 (q/k/v biases), Qwen3
(per-head q/k RMSNorm and a ``head_dim`` of its own) and Mistral (without a sliding window).

Parameter names follow Hugging Face's ``LlamaForCausalLM`` (``model.layers.N.self_attn.q_proj.weight``
and so on) so that HF weights load by name. A ``LlamaStage`` holds any contiguous run of layers,
plus the embedding (first stage) and the final norm and LM head (last stage); the whole model is
the stage that holds everything. Layers are kept in a ``ModuleDict`` keyed by their *global*
index, so a stage's parameter names are the same as the full model's.

``KVCache`` holds past keys and values for sampling: one token at a time, or several after cached
ones (a prompt's remainder after a shared prefix: a causal mask aligned bottom-right), and its rows
can be re-indexed so that rows with the same past share one prefill (``model/generate.py``).

The attention code infers head counts from tensor shapes, so a tensor-parallel shard that holds
``n_heads / tp`` heads runs the same code. No distributed code lives here: where tensor
parallelism needs a gradient summed over its ranks (the per-head q/k norms, whose weight every head
shares), ``RMSNorm.weight_hook`` lets ``runtime/parallel/tensor.py`` wrap the weight; where the embedding and
LM head are held in shards of vocabulary rows, ``LlamaStage.vocab`` (set by ``runtime/parallel/vocab.py``) does
their lookup, logits and loss.
"""

from __future__ import annotations

import contextvars
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from elastic.core.config import ModelConfig
from elastic.core.layout import TensorSpec
from elastic.model.cast_linear import CastLinear, cast_frozen, cast_linear
from elastic.model.loss import causal_lm_loss_sum as causal_lm_loss_sum  # re-exported: its callers import it here
from elastic.model.loss import chunk_positions, lm_loss_sum, lm_token_logps

# How tensor parallelism splits each linear (Megatron style): column-parallel layers split their
# output features, row-parallel ones their input features. Embedding, norms and the LM head are
# replicated across tp ranks: with a byte vocabulary they are small.
TP_PLAN: dict[str, str] = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}
TP_DIM = {"colwise": 0, "rowwise": 1}  # which dim of an nn.Linear weight [out, in] the style splits


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.weight_hook: Callable[[torch.Tensor], torch.Tensor] | None = None  # see the module docstring

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As HF: normalise in at least float32, then scale in the input dtype.
        dtype = x.dtype
        h = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight if self.weight_hook is None else self.weight_hook(self.weight)
        return weight * h.to(dtype)


def rope_key(cfg: ModelConfig) -> tuple:
    """What RoPE's frequencies depend on, hashable (the rope table's cache key)."""
    llama3 = (cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len)
    return (cfg.head_dim, cfg.rope_theta, cfg.rope_type, llama3 if cfg.rope_type == "llama3" else None)


def inverse_frequencies(key: tuple) -> torch.Tensor:
    """RoPE's inverse frequencies, as transformers computes them (``modeling_rope_utils``), in float64.

    ``llama3``: Llama 3.1's rule. Long wavelengths (beyond original_max_len / low_freq_factor) are
    divided by ``factor``, short ones (below original_max_len / high_freq_factor) kept, and the band
    between interpolated smoothly.
    """
    head_dim, theta, rope_type, llama3 = key
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if rope_type == "default":
        return inv_freq
    factor, low, high, original = llama3
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, smoothed, scaled)


@functools.lru_cache(maxsize=64)
def _rope_table(key: tuple, start: int, length: int, dtype: torch.dtype):
    inv_freq = inverse_frequencies(key)
    pos = torch.arange(start, start + length, dtype=torch.float64)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF Llama's rotary embedding (rotate_half form) on [B, H, T, head_dim]."""
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """Keys and values of past positions for incremental decoding, one slot per layer: [B, kv_heads, S, head_dim].

    A pass over new tokens appends their keys and values (``update``). ``select_rows`` re-indexes the batch,
    so that rows whose past is the same can share one prefill: a prompt's cache is copied to each of its
    completions, a common prefix's cache (batch 1) to every prompt (``model/generate.py``).
    """

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def length(self) -> int:
        return next(iter(self.keys.values())).shape[2] if self.keys else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.keys:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def select_rows(self, index: torch.Tensor) -> None:
        """Row ``i`` of the batch becomes old row ``index[i]``, in every layer (copies: rows may repeat)."""
        for layer in self.keys:
            self.keys[layer] = self.keys[layer].index_select(0, index)
            self.values[layer] = self.values[layer].index_select(0, index)


@dataclass(frozen=True)
class Padding:
    """Left-padded rows: which keys are real, and each new token's position.

    ``keys`` [B, S] is True for the real tokens among all S keys seen so far (cached ones included);
    ``positions`` [B, T] gives the RoPE position of each of the T new tokens (its index among its row's
    real tokens). A padded query sees only itself, so no softmax row is empty; real queries see the
    real keys at or before them. A row then computes what it computes unpadded (``padding_for``).
    """

    keys: torch.Tensor
    positions: torch.Tensor

    def rope(self, key: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = self.positions.to(torch.float64)[..., None] * inverse_frequencies(key)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, head_dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def attention(self, t: int, s: int) -> torch.Tensor:
        """Boolean mask [B, 1, t, s] for the last t of s keys as queries."""
        query = torch.arange(s - t, s)[:, None]
        key = torch.arange(s)[None, :]
        allowed = (key <= query)[None] & self.keys[:, None, :]
        allowed = allowed | (key == query)[None]  # a padded query attends to itself only
        return allowed[:, None]


def padding_for(mask: torch.Tensor, total: int | None = None) -> Padding:
    """The ``Padding`` of a batch of left-padded rows: ``mask`` [B, L] True at real tokens, for a pass over all
    L tokens; ``total`` extends the real keys with that many following (completion) tokens."""
    keys = mask.bool()
    if total is not None and total > keys.shape[1]:
        keys = torch.cat([keys, keys.new_ones(keys.shape[0], total - keys.shape[1])], dim=1)
    positions = (keys.long().cumsum(1) - 1).clamp(min=0)
    return Padding(keys, positions)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.head_dim, self.rope = layer, cfg.head_dim, rope_key(cfg)
        self.q_proj = CastLinear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = CastLinear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = CastLinear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = CastLinear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        # Qwen3: one RMSNorm over head_dim, shared by every head, before RoPE.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, start: int = 0, cache: KVCache | None = None,
                pad: Padding | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        # -1: a tensor-parallel shard holds n_heads / tp heads; the shapes tell how many.
        q = self.q_proj(x).view(b, t, -1, self.head_dim)
        k = self.k_proj(x).view(b, t, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if pad is None:
            cos, sin = _rope_table(self.rope, start, t, q.dtype)
        else:
            cos, sin = pad.rope(self.rope, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        gqa = q.shape[1] != k.shape[1]
        if pad is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=pad.attention(t, k.shape[2]), enable_gqa=gqa)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        s = k.shape[2]
        if t > 1 and s > t:
            # Several new tokens after cached ones (a prompt's remainder after a shared prefix): query i,
            # at position s - t + i, sees the keys at or before it (a causal mask aligned bottom-right).
            mask = torch.arange(s)[None, :] <= torch.arange(s - t, s)[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            # A fresh prefill is plainly causal; one new token after a cache sees every cached position.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = CastLinear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = CastLinear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = CastLinear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    # Activation checkpointing (``checkpoint_layers``): keep only the layer's input for backward and run
    # the layer again there. Done inside ``forward``, not around the module's call, so that FSDP's
    # hooks on the layer run once: in backward the layer is already gathered when the recompute runs
    # (torchtitan gets the same order by wrapping the layer before ``fully_shard``).
    checkpointed = False

    def forward(self, x: torch.Tensor, start: int = 0, cache: KVCache | None = None,
                pad: Padding | None = None) -> torch.Tensor:
        if self.checkpointed and cache is None and torch.is_grad_enabled():
            # Non-reentrant: the recommended form. The recompute runs in backward, outside the forward's
            # context managers, so it runs in a copy of the forward's context variables: LoRA dropout
            # finds the rows it was given (``lora.dropout_rows``) and draws the same mask.
            replay = functools.partial(contextvars.copy_context().run, self._forward)
            return torch.utils.checkpoint.checkpoint(replay, x, start, cache, pad, use_reentrant=False)
        return self._forward(x, start, cache, pad)

    def _forward(self, x: torch.Tensor, start: int, cache: KVCache | None, pad: Padding | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), start, cache, pad)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(nn.Module):
    """HF's ``model.`` prefix: embedding, layers and final norm."""

    def __init__(self, cfg: ModelConfig, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim) if first else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i) for i in layers})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps) if last else None


class LlamaStage(nn.Module):
    """Layers ``layers`` of the decoder; the first stage embeds tokens, the last one returns logits."""

    def __init__(self, cfg: ModelConfig, layers: range | None = None, first: bool = True, last: bool = True):
        super().__init__()
        self.cfg = cfg
        self.layer_ids = range(cfg.n_layers) if layers is None else layers
        self.first, self.last = first, last
        self.model = _Body(cfg, self.layer_ids, first, last)
        if cfg.tie_embeddings and last and not first:
            raise ValueError("tied embeddings need the embedding and the LM head in one pipeline stage (pp=1)")
        # Tied: the head is the embedding matrix itself, one Parameter (HF's tie_word_embeddings).
        self.lm_head = CastLinear(cfg.dim, cfg.vocab_size, bias=False) if last and not cfg.tie_embeddings else None
        # The vocabulary-sized weights held in shards of their rows, and the ops that use them so (lookup, logits,
        # loss); set by ``runtime/parallel/vocab.py`` under fsdp. None: the weights are whole here.
        self.vocab = None

    def forward(self, x: torch.Tensor, start: int = 0, cache: KVCache | None = None,
                pad: Padding | None = None, labels: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                with_entropy: bool = False):
        """Logits (last stage) or hidden states; ``pad``: left-padded rows (``Padding``), else every row is real.
        ``labels`` (last stage): the summed loss instead of the logits, computed inside the forward (so FSDP has
        the head gathered) in chunks over a large vocabulary (``model/loss.py``), or by ``self.vocab`` on the
        rank's vocabulary rows when the head is held in shards. ``targets`` [B, C] (last stage): the sequences'
        last C tokens; returns (their log-probs [B, C], each one's position's entropy [B, C] detached if
        ``with_entropy``, else None) given the tokens before them, the logits never whole (``lm_token_logps``,
        or ``self.vocab.token_logps`` on the rank's rows)."""
        h = self._embed(x) if self.first else x
        for layer in self.model.layers.values():
            h = layer(h, start, cache, pad)
        if not self.last:
            return h
        h = self.model.norm(h)
        if targets is not None:
            return self._token_logps(h[:, -targets.shape[1] - 1:-1], targets, with_entropy)
        if labels is not None and self.vocab is not None and self.vocab.head:
            return self.vocab.loss_sum(h, self._head_weight(), labels)
        if labels is not None:
            return lm_loss_sum(h, self._chunked_head(labels.numel()), self.cfg.vocab_size, labels)
        return self._head(h)

    def _token_logps(self, h: torch.Tensor, targets: torch.Tensor, with_entropy: bool):
        if h.shape[1] != targets.shape[1]:
            raise ValueError(f"{targets.shape[1]} targets need at least {targets.shape[1] + 1} positions")
        if self.vocab is not None and self.vocab.head:
            return self.vocab.token_logps(h, self._head_weight(), targets, with_entropy)
        return lm_token_logps(h, self._chunked_head(targets.numel()), self.cfg.vocab_size, targets, with_entropy)

    def _chunked_head(self, positions: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The head for a loss or log-probs over ``positions``. Where ``model/loss.py`` cuts them into chunks, a
        frozen float32 head under autocast (LoRA's tied embedding) is cast once for all of them (``cast_frozen``),
        not once per chunk, forward, recompute and backward: 57 casts of a 151,936 x 896 head for GRPO's 2,048
        positions took 2.6x the whole-logits time (``bench/grpo_logps_memory.py``). The copy (272 MB there) lives
        until the backward's recomputes are done, beside one chunk's logits."""
        if positions <= chunk_positions(self.cfg.vocab_size) or type(self.lm_head) not in (type(None), CastLinear):
            return self._head
        cast = cast_frozen(self._head_weight())
        return self._head if cast is None else (lambda h: F.linear(h, cast))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.vocab is not None:
            return self.vocab.embed(x, self.model.embed_tokens.weight)
        return self.model.embed_tokens(x)

    def _head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        if self.vocab is not None and self.vocab.head:
            return self.vocab.logits(h, self._head_weight())
        if self.lm_head is None:
            return cast_linear(h, self.model.embed_tokens.weight)
        return self.lm_head(h)  # perhaps a LoRALinear (a targeted untied head)


def checkpoint_layers(stage: nn.Module, on: bool = True) -> None:
    """Turn activation checkpointing on (or off) for every decoder layer of ``stage``: a layer's
    activations are recomputed in backward instead of kept, which trades one more forward for memory
    that no longer grows with the number of layers. The weights do not change (bit for bit)."""
    for module in stage.modules():
        if isinstance(module, DecoderLayer):
            module.checkpointed = on


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every parameter of the full model with its global shape and sharding rule, in model order."""
    specs = [TensorSpec("model.embed_tokens.weight", (cfg.vocab_size, cfg.dim), None, "embed")]
    with torch.device("meta"):  # shapes only: one layer on the meta device
        layer = DecoderLayer(cfg, 0)
    for i in range(cfg.n_layers):
        for local_name, param in layer.named_parameters():
            module = local_name.rsplit(".", 1)[0]
            style = TP_PLAN.get(module)
            tp_dim = TP_DIM[style] if style else None
            if local_name.endswith(".bias") and style == "rowwise":
                tp_dim = None  # a row-parallel layer adds its bias once, after the all-reduce
            specs.append(TensorSpec(f"model.layers.{i}.{local_name}", tuple(param.shape), tp_dim, "layer", i))
    specs.append(TensorSpec("model.norm.weight", (cfg.dim,), None, "head"))
    if not cfg.tie_embeddings:
        specs.append(TensorSpec("lm_head.weight", (cfg.vocab_size, cfg.dim), None, "head"))
    return specs
