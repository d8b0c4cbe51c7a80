"""One worker's side of GRPO: sampling rollouts, and a policy-gradient step on the engine.

Rollouts need the whole policy on each worker, so they run on a data-parallel layout (every
rank holds full parameters; the controller relayouts for the rollout phase). Sampling uses a
plain, unwrapped copy of the model evaluated with the engine's own tensors
(``torch.func.functional_call``: no copies, no FSDP hooks) and one random generator per
completion, seeded by (seed, GRPO step, global prompt index, sample index): a completion does not
depend on which worker draws it or on its batch-mates. With LoRA the frozen base is the
reference model: its log-probs are the same forward with the adapters' B set to zero.

The policy step runs in whatever layout the training phase uses (fsdp, tp, dp); its loss is a
sum over this rank's sequences divided by a normaliser of the global batch, so the summed
gradient equals the single-process one (see ``recipes/grpo/loss.py``).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from elastic.model.generate import SamplingConfig, sample
from elastic.model.init import stable_seed
from elastic.model.llama import LlamaStage
from elastic.model.lora import apply_lora, is_lora_name
from elastic.model.tokenizer import EOS
from elastic.recipes.grpo.loss import GlobalBatch, grpo_loss_terms
from elastic.runtime.engine import Engine, StepResult, local_part


class _Functional:
    """Calls a parameterless (meta) model with the given tensors."""

    def __init__(self, model: LlamaStage, params: dict[str, torch.Tensor]) -> None:
        self.model, self.params = model, params

    def __call__(self, x, start=0, cache=None):
        return functional_call(self.model, self.params, (x, start, cache))


def _plain_model(engine: Engine) -> LlamaStage:
    if getattr(engine, "_plain", None) is None:
        with torch.device("meta"):
            model = LlamaStage(engine.cfg.model)
            if engine.cfg.lora is not None:
                apply_lora(model, engine.cfg.lora)
        engine._plain = model.to(engine.dtype)
    return engine._plain


def token_logps(model, input_ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Per-token log-probs [B, C] of the completion tokens input_ids[:, prompt_len:]."""
    logits = model(input_ids)[:, prompt_len - 1 : -1]
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    targets = input_ids[:, prompt_len:]
    return torch.gather(F.log_softmax(logits, dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def rollout(engine: Engine, prompts: list[tuple[int, list[int]]], grpo, grpo_step: int) -> dict:
    """Sample ``grpo.num_generations`` completions for each (global prompt index, token ids)."""
    layout = engine.layout
    if (layout.fsdp, layout.tp, layout.pp) != (1, 1, 1):
        raise ValueError(f"rollouts run on data-parallel layouts (every rank holds the full policy), not {layout}; "
                         "the controller relayouts for the rollout phase")
    if not prompts:
        return {"prompts": [], "tokens": torch.empty(0, grpo.max_new_tokens, dtype=torch.long)}
    params = {name: local_part(p) for name, p in engine.named_params}
    policy = _Functional(_plain_model(engine), params)
    groups = grpo.num_generations
    batch = torch.tensor([ids for _, ids in prompts for _ in range(groups)], dtype=torch.long)
    generators = [torch.Generator().manual_seed(stable_seed(engine.cfg.train.seed, "rollout", grpo_step, index, g))
                  for index, _ in prompts for g in range(groups)]
    cfg = SamplingConfig(grpo.max_new_tokens, grpo.temperature, grpo.top_p, (EOS,))
    tokens, lengths = sample(policy, batch, cfg, generators)
    full = torch.cat([batch, tokens], dim=1)
    out = {"prompts": [index for index, _ in prompts], "tokens": tokens, "lengths": lengths}
    if grpo.num_iterations > 1:  # the sampling policy's log-probs, reused by later iterations
        out["old"] = token_logps(policy, full, batch.shape[1])
    if grpo.beta > 0:
        reference = dict(params)
        for name in params:
            if is_lora_name(name) and ".lora_B." in name:
                reference[name] = torch.zeros_like(params[name])
        out["ref"] = token_logps(_Functional(_plain_model(engine), reference), full, batch.shape[1])
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
    logps = token_logps(engine.module, shard["input_ids"], prompt_len)
    terms = grpo_loss_terms(logps, shard["advantages"].to(logps.dtype), shard["mask"], old_logps=shard.get("old"),
                            ref_logps=shard.get("ref"), epsilon=grpo.epsilon, epsilon_high=grpo.epsilon_high,
                            beta=grpo.beta, loss_type=grpo.loss_type)
    loss = terms.loss_sum / normaliser
    loss.backward()
    loss_total += loss.detach().double()
    result = engine.conclude(loss_total, int(batch.num_tokens), shard.get("prompts", []), started)
    result.metrics = {k: float(v) for k, v in (("kl_sum", terms.kl_sum), ("clipped", terms.region_clipped),
                                               ("tokens", terms.num_tokens))}
    return result


def run_grpo_local(cfg, steps: int | None = None) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The single-process GRPO run (the reference the distributed runs must equal).

    Returns (per-step records, final full state).
    """
    from elastic.core.layout import Layout, Placement
    from elastic.recipes.grpo.loop import GRPOLoop

    loop = GRPOLoop(cfg)
    engine = Engine(cfg, Placement(Layout(), (0,)), 0)
    records, batch = [], None
    for step in range(cfg.train.steps if steps is None else steps):
        k, iteration = divmod(step, cfg.grpo.num_iterations)
        if iteration == 0:
            batch = loop.build(k, [rollout(engine, loop.prompts(k), cfg.grpo, k)])
        result = compute_grpo(engine, loop.shard(batch, 0, 1), batch.batch, cfg.grpo)
        engine.apply()
        records.append({"step": step, "loss": result.loss, **batch.stats})
    return records, {k: v.clone() for k, v in engine.local_state().items()}
