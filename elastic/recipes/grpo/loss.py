"""The GRPO policy loss, following TRL's ``GRPOTrainer._compute_loss``, split into shard-summable terms.

Per completion token t of sequence i (shapes [B, T]; ``advantages`` [B]):

    coef_1 = exp(logp - old_logp)                       importance ratio ("token" level, TRL's default)
    coef_2 = clamp(coef_1, 1 - epsilon, 1 + epsilon_high)
    loss_t = -min(coef_1 * A_i, coef_2 * A_i)             PPO clipped surrogate, asymmetric clip (DAPO)
    loss_t += beta * (exp(ref - logp) - (ref - logp) - 1)  k3 estimator of KL(pi || pi_ref), if beta != 0

``old_logp`` is the policy's log-prob when the completion was sampled. With num_iterations = 1 (one
gradient step per generation) TRL skips computing it and uses ``logp.detach()``: the ratio is then 1
but its gradient is the policy gradient. With num_iterations > 1 the batch is reused, so the engine
must store the log-probs from sampling time and pass them here. Pass ``old_logps=None`` for the first.

Aggregation. TRL reduces ``loss_t * mask`` per ``loss_type``; every variant is a SUM over sequences
of a per-sequence contribution c_i, divided by a normaliser N taken from the GLOBAL batch:

    loss_type  c_i                              N (global)                         TRL (one process, GA=1)
    "grpo"     sum_t loss_t m_t / max(T_i, 1)   number of sequences B              mean_i of per-sequence means
    "bnpo"     sum_t loss_t m_t                 completion tokens sum_i T_i        sum / mask.sum()
    "dr_grpo"  sum_t loss_t m_t                 B * max_completion_length          sum / (B * max_completion_length)
    "dapo"     sum_t loss_t m_t                 num_items_in_batch (see below)     sum / num_items_in_batch
    "cispo"    sum_t loss_t m_t                 num_items_in_batch                 as dapo
    "sapo"     sum_t loss_t m_t / max(T_i, 1)   number of sequences B              as grpo

(T_i = tokens in sequence i's completion mask.) A data-parallel rank or micro-batch computes
``LossTerms.loss_sum`` over its own sequences and divides by the global N; the ranks' losses, and
so their gradients, then SUM to the single-process loss and gradient for any split. Pass the global
quantities in a ``GlobalBatch``.

How TRL gets these numbers in a multi-process run (and where we differ):
- "grpo" and "dr_grpo": each micro-batch divides by its local B (and B * max_completion_length),
  then by the gradient-accumulation steps, and DDP averages over processes. With TRL's equal-sized
  micro-batches this is exactly the global N above.
- "dapo": TRL 1.x computes ``num_items_in_batch = gather(loss_mask.sum()).sum()`` over the whole
  generation batch (all processes and all accumulation micro-batches of the optimizer step), AFTER
  ``mask_truncated_completions`` zeroed truncated completions. Each micro-batch's loss is
  ``sum / (num_items_in_batch / num_processes)`` with no division by accumulation steps, and DDP's
  averaging divides by num_processes again, so the step's gradient is that of sum_all / num_items_in_batch.
  (TRL 0.x counted before ``mask_truncated_completions``; TRL 1.x counts after it, as we do.)
- "bnpo": TRL normalises by the LOCAL token count of each micro-batch (its docs say results vary with
  the local batch size). That cannot be split-invariant, so we use the global token count, which is
  TRL's single-process, no-accumulation value. (It then equals "dapo" whenever no tokens are masked out.)

TRL 1.x's policy-term knobs (``PolicyKnobs``: GSPO's sequence-level ratio, ``delta`` two-sided
clipping, CISPO's detached clipped ratio times the log-prob, SAPO's sigmoid gate) act per token or per
sequence, so they keep the split invariance; ``tests/unit/test_trl_knobs.py`` runs TRL's own
``_compute_loss`` on fixed tensors for each. ``mask_truncated_completions`` is applied to the mask on
the driver before the global counts are taken, which is TRL 1.x's current rule for num_items_in_batch.
``top_entropy_quantile`` keeps the policy term on tokens whose entropy reaches a quantile of the WHOLE
batch's token entropies (``high_entropy_mask``; the worker gathers them from every rank first).

Metrics follow TRL's ``_compute_loss`` and carry its names: ``kl`` (mean k3 KL over the loss mask's
tokens, with beta > 0), ``entropy`` (mean next-token entropy over the same tokens), and for the
PPO-clipped loss types ``clip_ratio/low_mean`` (coef_1 < 1 - epsilon and A < 0), ``high_mean`` (coef_1 >
1 + epsilon_high and A > 0) and ``region_mean`` (either); CISPO logs ``cispo_clip_ratio``, SAPO no clip
ratio. As in TRL's ``global_masked_mean``, a clip ratio counts tokens, or sequences when the importance
ratio is per sequence (GSPO). Each is kept as a (sum, count) pair (``LossTerms.sums``) that data shards
add, so the global mean is exact for any split, as TRL's reduce of sums and counts over processes is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
IMPORTANCE_LEVELS = ("token", "sequence")
PER_SEQUENCE_MEAN = ("grpo", "sapo")  # c_i is a per-sequence mean; N is the number of sequences


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}")


@dataclass(frozen=True)
class GlobalBatch:
    """Quantities of the whole optimizer-step batch (all ranks, all micro-batches) that normalise the loss.

    ``grpo`` needs ``num_sequences``; ``bnpo`` needs ``num_tokens``; ``dr_grpo`` needs ``num_sequences``
    and ``max_completion_length`` (the sampling cap, not the longest completion seen); ``dapo`` needs
    ``num_items_in_batch``, which defaults to ``num_tokens``.
    """

    num_sequences: int
    num_tokens: int
    max_completion_length: int
    num_items_in_batch: int | None = None

    def __post_init__(self) -> None:
        for name, least in (("num_sequences", 1), ("num_tokens", 0), ("max_completion_length", 1),
                            ("num_items_in_batch", 0)):
            value = getattr(self, name)
            if name == "num_items_in_batch" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"GlobalBatch.{name}={value!r} must be an integer >= {least}")

    @classmethod
    def of(cls, completion_masks: torch.Tensor | Sequence[torch.Tensor], max_completion_length: int,
           num_items_in_batch: int | None = None) -> GlobalBatch:
        """From the completion masks of the whole batch: one [B, T] tensor, or one per shard."""
        masks = [completion_masks] if isinstance(completion_masks, torch.Tensor) else list(completion_masks)
        return cls(num_sequences=sum(int(m.shape[0]) for m in masks),
                   num_tokens=sum(int(m.sum()) for m in masks),
                   max_completion_length=max_completion_length,
                   num_items_in_batch=num_items_in_batch)

    def normaliser(self, loss_type: str) -> float:
        """N in loss = sum_i c_i / N (see the module docstring)."""
        _check_loss_type(loss_type)
        if loss_type in PER_SEQUENCE_MEAN:
            return float(self.num_sequences)
        if loss_type == "dr_grpo":
            return float(self.num_sequences * self.max_completion_length)
        if loss_type == "bnpo":
            return float(max(self.num_tokens, 1))  # TRL: completion_mask.sum().clamp(min=1.0)
        items = self.num_tokens if self.num_items_in_batch is None else self.num_items_in_batch
        return float(max(items, 1))  # "dapo", "cispo": TRL's num_items_in_batch.clamp(min=1.0)


@dataclass
class LossTerms:
    """One shard's contribution: the differentiable loss sum and summable (detached) metric counts.

    Shards' terms add with ``+``; ``loss(batch)`` and ``metrics()`` then give global values.
    """

    loss_type: str
    loss_sum: torch.Tensor          # sum_i c_i over this shard's sequences (carries the gradient)
    num_tokens: torch.Tensor        # completion tokens in this shard
    kl_sum: torch.Tensor            # sum of masked per-token k3 KL (0 without reference log-probs)
    low_clipped: torch.Tensor       # clipped tokens (or sequences, GSPO): TRL's clip_ratio/low, high and region
    high_clipped: torch.Tensor
    region_clipped: torch.Tensor
    clip_units: torch.Tensor        # what the clip ratios divide by: mask tokens, or sequences (GSPO)
    entropy_sum: torch.Tensor       # sum of masked per-token entropies (0 when none were given)
    has_kl: bool = field(default=False)
    has_entropy: bool = field(default=False)

    def __add__(self, other: LossTerms) -> LossTerms:
        if self.loss_type != other.loss_type:
            raise ValueError(f"cannot add loss terms of loss_type {self.loss_type!r} and {other.loss_type!r}")
        flags = ("loss_type", "has_kl", "has_entropy")
        summed = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self) if f.name not in flags}
        return LossTerms(self.loss_type, has_kl=self.has_kl or other.has_kl,
                         has_entropy=self.has_entropy or other.has_entropy, **summed)

    def loss(self, batch: GlobalBatch) -> torch.Tensor:
        """This shard's share of the global loss: loss_sum / N(global batch)."""
        return self.loss_sum / batch.normaliser(self.loss_type)

    def sums(self) -> dict[str, tuple[float, float]]:
        """TRL's metric names, each as (sum, count) over these terms' rows: shards' pairs add up to the batch's."""
        tokens, units = float(self.num_tokens), float(self.clip_units)
        out: dict[str, tuple[float, float]] = {}
        if self.has_kl:
            out["kl"] = (float(self.kl_sum), tokens)
        if self.has_entropy:
            out["entropy"] = (float(self.entropy_sum), tokens)
        if self.loss_type == "cispo":
            out["cispo_clip_ratio"] = (float(self.high_clipped), units)
        elif self.loss_type != "sapo":  # SAPO's soft gate clips nothing
            out.update({"clip_ratio/low_mean": (float(self.low_clipped), units),
                        "clip_ratio/high_mean": (float(self.high_clipped), units),
                        "clip_ratio/region_mean": (float(self.region_clipped), units)})
        return out

    def metrics(self) -> dict[str, float]:
        """The means of ``sums`` (global once all shards are added); an empty count gives 0, as TRL's clamp."""
        return {name: total / max(count, 1.0) for name, (total, count) in self.sums().items()}


def _check_shapes(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  others: dict[str, torch.Tensor | None]) -> None:
    if logps.dim() != 2:
        raise ValueError(f"logps must be [batch, completion_len], got shape {tuple(logps.shape)}")
    if tuple(advantages.shape) != (logps.shape[0],):
        raise ValueError(f"advantages must be [{logps.shape[0]}] (one per sequence), got {tuple(advantages.shape)}")
    for name, tensor in {"completion_mask": mask, **others}.items():
        if tensor is not None and tensor.shape != logps.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but logps has {tuple(logps.shape)}")


@dataclass(frozen=True)
class PolicyKnobs:
    """TRL 1.x's knobs of the policy term, with TRL's names and defaults (``GRPOConfig``).

    - ``importance_sampling_level``: "token" (one ratio per token) or "sequence" (GSPO: the exp of the
      mean token log-ratio of the sequence, one ratio per sequence);
    - ``delta``: two-sided clipping, coef_1 = min(coef_1, delta) inside the PPO min (None: off);
    - ``sapo_temperature_pos`` / ``_neg``: SAPO's soft gate temperatures for A > 0 and A <= 0.

    Every knob acts per token or per sequence, so a shard's terms still sum to the whole batch's.
    """

    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    importance_sampling_level: str = "token"
    delta: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05

    def __post_init__(self) -> None:
        if self.importance_sampling_level not in IMPORTANCE_LEVELS:
            raise ValueError(f"importance_sampling_level={self.importance_sampling_level!r} is not one of "
                             f"{IMPORTANCE_LEVELS}")
        if self.delta is not None and not self.delta > 1:
            raise ValueError(f"delta={self.delta!r} must be > 1 (it caps the ratio from above; None turns it off)")

    @property
    def high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def importance_weights(logps: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """TRL's coef_1: exp(log-ratio) per token [B, T], or per sequence [B, 1] (GSPO)."""
    log_ratio = logps - old
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    return torch.exp(log_ratio)


def per_token_loss(logps: torch.Tensor, advantages: torch.Tensor, old_logps: torch.Tensor | None = None,
                   ref_logps: torch.Tensor | None = None, epsilon: float = 0.2, epsilon_high: float | None = None,
                   beta: float = 0.0, *, loss_type: str = "dapo", mask: torch.Tensor | None = None,
                   knobs: PolicyKnobs | None = None, entropy_mask: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """TRL's unmasked per-token loss ([B, T], or [B, 1] for a sequence-level policy term without KL), the
    importance ratio coef_1 as the clip metrics see it, and the k3 KL (or None). ``entropy_mask`` (TRL's
    top_entropy_quantile) keeps the policy term on the high-entropy tokens only; the KL stays everywhere."""
    k = knobs or PolicyKnobs(epsilon, epsilon_high, beta)
    old = logps.detach() if old_logps is None else old_logps
    mask = torch.ones_like(logps) if mask is None else mask.to(logps.dtype)
    coef_1 = importance_weights(logps, old, mask, k.importance_sampling_level)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    if loss_type == "cispo":  # CISPO: a clipped, detached ratio weighting the plain policy gradient
        loss = -torch.clamp(coef_1, max=k.high).detach() * adv * logps
    elif loss_type == "sapo":  # SAPO: a smooth sigmoid gate instead of the hard clip
        temperature = torch.where(adv > 0, k.sapo_temperature_pos, k.sapo_temperature_neg)
        loss = -torch.sigmoid(temperature * (coef_1 - 1)) * 4 / temperature * adv
    else:
        coef_2 = torch.clamp(coef_1, 1 - k.epsilon, 1 + k.high)
        if k.delta is not None:
            coef_1 = torch.clamp(coef_1, max=k.delta)
        loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if entropy_mask is not None:
        loss = loss * entropy_mask.to(loss.dtype)
    kl = None
    if ref_logps is not None:
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
    if k.beta != 0.0:
        if kl is None:
            raise ValueError(f"beta={k.beta} weights a KL penalty to the reference model; pass ref_logps "
                             "(the reference model's per-token log-probs) or set beta=0")
        loss = loss + k.beta * kl
    return loss, coef_1, kl


def grpo_loss_terms(logps: torch.Tensor, advantages: torch.Tensor, completion_mask: torch.Tensor, *,
                    old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
                    epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
                    loss_type: str = "dapo", knobs: PolicyKnobs | None = None,
                    entropy_mask: torch.Tensor | None = None, entropies: torch.Tensor | None = None) -> LossTerms:
    """One shard's ``LossTerms``: logps, old_logps, ref_logps and completion_mask are [B, T], advantages [B].

    ``logps`` are the current policy's per-token log-probs of the sampled completion tokens (with
    gradient); ``old_logps=None`` means num_iterations = 1 (old = current, detached). ``knobs``
    (TRL 1.x's policy-term options) replaces epsilon, epsilon_high and beta when given. ``entropies``
    [B, T] (detached), when given, are summed for TRL's ``entropy`` metric.
    """
    _check_loss_type(loss_type)
    _check_shapes(logps, advantages, completion_mask, {"old_logps": old_logps, "ref_logps": ref_logps})
    k = knobs or PolicyKnobs(epsilon, epsilon_high, beta)
    mask = completion_mask.to(logps.dtype)
    loss, coef_1, kl = per_token_loss(logps, advantages, old_logps, ref_logps, loss_type=loss_type, mask=mask,
                                      knobs=k, entropy_mask=entropy_mask)
    masked = loss * mask
    if loss_type in PER_SEQUENCE_MEAN:
        loss_sum = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    else:
        loss_sum = masked.sum()
    with torch.no_grad():
        adv = advantages.unsqueeze(1)
        zero = mask.new_zeros(())
        if loss_type == "cispo":  # TRL's cispo_clip_ratio, counted as "high"
            low, high = torch.zeros_like(coef_1, dtype=torch.bool), (coef_1 > k.high) & (adv > 0)
        elif loss_type == "sapo":  # no hard clip
            low = high = torch.zeros_like(coef_1, dtype=torch.bool)
        else:
            low = (coef_1 < 1 - k.epsilon) & (adv < 0)
            high = (coef_1 > 1 + k.high) & (adv > 0)
        # TRL's global_masked_mean: a per-sequence ratio [B, 1] counts sequences, a per-token one masked tokens.
        per_sequence = coef_1.shape[1] == 1
        weight = mask.new_ones(coef_1.shape) if per_sequence else mask
        return LossTerms(
            loss_type=loss_type,
            loss_sum=loss_sum,
            num_tokens=mask.sum(),
            kl_sum=(kl.detach() * mask).sum() if kl is not None else zero,
            low_clipped=(low * weight).sum(),
            high_clipped=(high * weight).sum(),
            region_clipped=((low | high) * weight).sum(),
            clip_units=weight.sum(),
            entropy_sum=(entropies.detach() * mask).sum() if entropies is not None else zero,
            has_kl=kl is not None,
            has_entropy=entropies is not None,
        )


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each position's next-token distribution, as TRL's ``entropy_from_logits``."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, quantile: float,
                      batch_entropies: torch.Tensor) -> torch.Tensor:
    """TRL's ``get_high_entropy_mask``: tokens whose entropy reaches the (1 - quantile) quantile of
    ``batch_entropies``, the entropies of every completion token of the GLOBAL batch (TRL gathers them from
    every process), taken in float32 as TRL does; padding is never kept."""
    if batch_entropies.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    threshold = torch.quantile(batch_entropies.float(), 1 - quantile)
    return ((entropies * mask.to(entropies.dtype)) >= threshold) & mask.bool()


def grpo_loss(logps: torch.Tensor, advantages: torch.Tensor, completion_mask: torch.Tensor, *,
              max_completion_length: int | None = None, num_items_in_batch: int | None = None,
              **kwargs) -> tuple[torch.Tensor, dict[str, float]]:
    """Single-process convenience: the whole batch is one shard. Returns (loss, metrics).

    ``max_completion_length`` defaults to the mask's width; other keywords go to ``grpo_loss_terms``.
    """
    terms = grpo_loss_terms(logps, advantages, completion_mask, **kwargs)
    width = completion_mask.shape[1] if max_completion_length is None else max_completion_length
    batch = GlobalBatch.of(completion_mask, width, num_items_in_batch)
    return terms.loss(batch), terms.metrics()
