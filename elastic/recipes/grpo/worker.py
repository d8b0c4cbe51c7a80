"""The worker's side of GRPO: the ``Rollout`` and ``GRPOStep`` tasks the GRPO workload sends.

Tasks are small dataclasses (``runtime/tasks.py``) whose ``run`` executes inside the worker with its
engine; Ray ships them by reference to this module, so the worker module never imports the recipe.

Rollouts need the whole policy on each worker, so they run on a data-parallel layout (every
rank holds full parameters; the controller relayouts for the rollout phase). Sampling uses a
plain, unwrapped copy of the model in eval mode, evaluated with the engine's own tensors
(``torch.func.functional_call``: no copies, no FSDP hooks), and one random generator per
completion, seeded by (seed, GRPO step, global prompt index, sample index): a completion does not
depend on which worker draws it or on its batch-mates. The batch holds each prompt G times; the
sampler prefills each prompt once (and a long prefix common to all once) and copies its KV cache to
its G rows (``model/generate.py``). With LoRA the frozen base is the reference model: its
log-probs are the same forward with the adapters' B set to zero. LoRA dropout acts in the policy
step only (masks seeded per optimizer step and global completion index); sampling and the old and
reference log-probs name no rows, so they have none.

The policy step runs in whatever layout the training phase uses (fsdp, tp, dp); its loss is a
sum over this rank's sequences divided by a normaliser of the global batch, so the summed
gradient equals the single-process one (see ``recipes/grpo/loss.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.func import functional_call

from elastic.core.seeds import stable_seed
from elastic.core.tokenizer import load_tokenizer
from elastic.model.generate import SamplingConfig, sample
from elastic.model.llama import LlamaStage, Padding, padding_for
from elastic.model.lora import apply_lora, is_lora_name
from elastic.recipes.grpo.config import GRPOConfig
from elastic.recipes.grpo.loss import GlobalBatch, grpo_loss_terms, high_entropy_mask
from elastic.runtime.engine import Engine, StepResult
from elastic.runtime.parallel.shards import gather_data_shards
from elastic.runtime.tasks import TaskContext
from elastic.runtime.torch_compat import local_tensor


class _Functional:
    """Calls a parameterless (meta) model with the given tensors."""

    def __init__(self, model: LlamaStage, params: dict[str, torch.Tensor]) -> None:
        self.model, self.params = model, params

    def __call__(self, x, start=0, cache=None, pad=None, **kwargs):
        return functional_call(self.model, self.params, (x, start, cache, pad), kwargs)


def _plain_model(engine: Engine, scratch: dict) -> LlamaStage:
    """An unwrapped copy of the policy on the meta device (no storage), cached for the engine's life.

    In eval mode: it only samples and scores (rollouts, old and reference log-probs), so nothing that
    acts in training mode (LoRA dropout) may touch it, whatever context it is called in."""
    if "plain" not in scratch:
        with torch.device("meta"):
            model = LlamaStage(engine.cfg.model)
            if engine.cfg.lora is not None:
                apply_lora(model, engine.cfg.lora)
        scratch["plain"] = model.to(engine.dtype).eval()
    return scratch["plain"]


def padding(prompt_mask: torch.Tensor | None, total: int) -> Padding | None:
    """The model's ``Padding`` for left-padded prompts followed by completions (None: no padding at all,
    which keeps the unpadded attention path for prompts of one length)."""
    if prompt_mask is None or bool(prompt_mask.all()):
        return None
    return padding_for(prompt_mask, total)


def token_logps(model, input_ids: torch.Tensor, prompt_len: int, prompt_mask: torch.Tensor | None = None,
                with_entropy: bool = False):
    """Per-token log-probs [B, C] of the completion tokens input_ids[:, prompt_len:] (and, ``with_entropy``,
    each position's entropy [B, C], detached). The model's forward computes them (``targets=``) in chunks of
    positions, or on its rank's vocabulary rows under fsdp: no [B, C, vocabulary] logits (``model/loss.py``,
    ``runtime/parallel/vocab_logps.py``)."""
    pad = padding(prompt_mask, input_ids.shape[1])
    logps, entropies = model(input_ids, 0, None, pad, targets=input_ids[:, prompt_len:], with_entropy=with_entropy)
    return (logps, entropies) if with_entropy else logps


def batch_entropies(engine: Engine, entropies: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The entropies of every completion token of the global batch: each data shard's, once (tp peers hold
    the same rows), gathered from every rank so that the quantile does not depend on the layout."""
    return torch.cat(gather_data_shards(engine.layout, engine.rank, entropies[mask.bool()].float()))


def rollout_batch(prompts: list[tuple[int, list[int], list[bool] | None]], groups: int, seed: int,
                  grpo_step: int) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Generator]]:
    """The sampler's inputs for (global prompt index, token ids, real-token mask or None) prompts: each prompt
    ``groups`` times in a row [B = P * G, width], their mask (None when no row is padded: the unpadded
    attention path), and one generator per completion, seeded by (seed, GRPO step, prompt index, sample)."""
    batch = torch.tensor([ids for _, ids, _ in prompts for _ in range(groups)], dtype=torch.long)
    prompt_mask = None
    if any(mask is not None for _, _, mask in prompts):
        prompt_mask = torch.tensor([mask for _, _, mask in prompts for _ in range(groups)], dtype=torch.bool)
    if padding(prompt_mask, batch.shape[1]) is None:
        prompt_mask = None
    generators = [torch.Generator().manual_seed(stable_seed(seed, "rollout", grpo_step, index, g))
                  for index, _, _ in prompts for g in range(groups)]
    return batch, prompt_mask, generators


@torch.no_grad()
def rollout(engine: Engine, prompts: list[tuple[int, list[int]]], grpo, grpo_step: int,
            scratch: dict | None = None) -> dict:
    """Sample ``grpo.num_generations`` completions for each (global prompt index, token ids, real-token mask
    or None) of left-padded prompts."""
    layout = engine.layout
    if (layout.fsdp, layout.tp, layout.pp) != (1, 1, 1):
        raise ValueError(f"rollouts run on data-parallel layouts (every rank holds the full policy), not {layout}; "
                         "the controller relayouts for the rollout phase")
    if not prompts:
        return {"prompts": [], "tokens": torch.empty(0, grpo.max_new_tokens, dtype=torch.long)}
    # At train.dtype: the plain model samples outside autocast, and frozen weights may be stored in bf16 (exact
    # float32 copies of them; model/specs.stored_in_bf16).
    params = {name: local_tensor(p).to(engine.dtype) for name, p in engine.named_params}
    scratch = {} if scratch is None else scratch
    policy = _Functional(_plain_model(engine, scratch), params)
    batch, prompt_mask, generators = rollout_batch(prompts, grpo.num_generations, engine.cfg.train.seed, grpo_step)
    if "eos" not in scratch:
        scratch["eos"] = load_tokenizer(engine.cfg.data.tokenizer).eos_id
    cfg = SamplingConfig(grpo.max_new_tokens, grpo.temperature, grpo.top_p, (scratch["eos"],))
    # Each prompt is prefilled once and its KV cache shared by its G rows (``sample``'s share_prefill).
    tokens, lengths = sample(policy, batch, cfg, generators, prompt_mask=prompt_mask)
    full = torch.cat([batch, tokens], dim=1)
    out = {"prompts": [index for index, _, _ in prompts], "tokens": tokens, "lengths": lengths}
    if grpo.num_iterations > 1:  # the sampling policy's log-probs, reused by later iterations
        out["old"] = token_logps(policy, full, batch.shape[1], prompt_mask)
    if grpo.beta > 0:
        reference = dict(params)
        for name in params:
            if is_lora_name(name) and ".lora_B." in name:
                reference[name] = torch.zeros_like(params[name])
        out["ref"] = token_logps(_Functional(_plain_model(engine, scratch), reference), full, batch.shape[1],
                                 prompt_mask)
    return out


def compute_grpo(engine: Engine, shard: dict, batch: GlobalBatch, grpo) -> StepResult:
    """Forward and backward of the GRPO loss on this rank's ``shard`` of the global rollout batch.

    ``shard`` holds input_ids [n, P + C], mask [n, C], advantages [n] and, as configured, old and
    ref log-probs [n, C]; ``batch`` the global quantities the loss is normalised by.
    """
    started = time.perf_counter()
    prompt_len = shard["input_ids"].shape[1] - shard["mask"].shape[1]
    normaliser = batch.normaliser(grpo.loss_type)
    loss_total = torch.zeros((), dtype=torch.float64)
    if shard["input_ids"].shape[0] == 0:
        raise ValueError(f"rank {engine.rank} got no sequences; use fewer data-parallel ranks than sequences")
    entropy_mask = None
    with engine.dropout_rows(shard["completion"].tolist()):  # LoRA dropout's masks, per global completion
        logps, entropies = token_logps(engine.module, shard["input_ids"], prompt_len, shard.get("prompt_mask"),
                                       with_entropy=True)  # TRL logs the entropy whatever top_entropy_quantile is
    if grpo.top_entropy_quantile < 1:
        everyone = batch_entropies(engine, entropies, shard["mask"])
        entropy_mask = high_entropy_mask(entropies, shard["mask"], grpo.top_entropy_quantile, everyone)
    terms = grpo_loss_terms(logps, shard["advantages"].to(logps.dtype), shard["mask"], old_logps=shard.get("old"),
                            ref_logps=shard.get("ref"), loss_type=grpo.loss_type, knobs=grpo.knobs,
                            entropy_mask=entropy_mask, entropies=entropies)
    loss = terms.loss_sum / normaliser
    loss.backward()
    loss_total += loss.detach().double()
    trained = shard["completion"].tolist()  # the rows this rank's loss covered (the run's ledger)
    result = engine.conclude(loss_total, int(batch.num_tokens), trained, started)
    result.metrics = terms.sums()  # TRL's kl, entropy and clip ratios as (sum, count): the driver adds data shards
    return result


@dataclass(frozen=True)
class Rollout:
    """Sample ``num_generations`` completions for each (global prompt index, token ids) of GRPO step ``grpo_step``."""

    prompts: list
    grpo_step: int

    def run(self, ctx: TaskContext) -> dict:
        return rollout(ctx.engine, self.prompts, GRPOConfig.of(ctx.engine.cfg), self.grpo_step, ctx.scratch)


@dataclass(frozen=True)
class GRPOStep:
    """One GRPO optimizer step on this rank's ``shard`` of the rollout batch (``batch``: its global quantities)."""

    shard: dict
    batch: GlobalBatch

    def run(self, ctx: TaskContext) -> StepResult:
        return compute_grpo(ctx.engine, self.shard, self.batch, GRPOConfig.of(ctx.engine.cfg))
