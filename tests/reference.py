"""The independent reference trainer: one process, plain torch, nothing of the engine's training loop.

Every equivalence test compares the elastic runs (any layout, live reshards, crashes, checkpoint
resumes, LoRA, GRPO) against this, never against the engine itself. From ``elastic`` it takes only:

- the model definition (``LlamaStage``, the names and initial values of its tensors; from a Hugging
  Face folder, the weights as transformers loads them); LoRA adapters come from PEFT's
  ``get_peft_model`` on that model, with our initial A copied in;
- the data: the dataset's samples by global index, and the epoch permutation (``GlobalSampler.index_at``);
- the seed function (``core/seeds.stable_seed``), which defines every random draw;
- for GRPO: the prompt sets and the tokenizer (``PromptTask``, ``load_tokenizer``).

Sampling is written here too (``reference_sample``), not taken from ``model/generate.py``: each
completion alone, unpadded, every token from a full forward of everything so far (no KV cache), then
softmax(logits / T), a hand-written top-p, and a categorical draw by the exponential race from the
sample's seeded generator. ``tests/unit/test_sampling.py`` checks ``generate.sample`` against it.

What a shared bug could hide is written here again, from the config's numbers and DESIGN.md: which
positions a step consumes, the loss normaliser (cross-entropy summed over the global batch divided by
its target tokens), the AdamW parameter groups, the warmup + cosine schedule (``LambdaLR``),
``torch.optim.AdamW`` (its reference implementation, ``foreach=False``) and ``clip_grad_norm_``, and
LoRA dropout's seeded masks (``SeededDropout`` in place of PEFT's ``nn.Dropout``).
Mixed precision (``train.mixed_precision = "bf16"``) is what users of transformers get from ``bf16=True``:
the model's forward inside ``torch.autocast("cpu", dtype=torch.bfloat16)`` over float32 weights, the loss
on the logits upcast to float32 (transformers' ``ForCausalLMLoss``), float32 AdamW.
GRPO's group advantages, clipped loss and k3 KL penalty (beta > 0; the reference model is LoRA's frozen
base, through PEFT's ``disable_adapter``) are TRL's formulas, written here and checked by hand in
``tests/unit/test_reference.py``; injected reward noise is the flip channel's definition (``noisy_rewards``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from elastic.core.config import Config
from elastic.core.data import GlobalSampler, build_dataset
from elastic.core.seeds import stable_seed
from elastic.model.init import init_tensor
from elastic.model.llama import LlamaStage, tensor_specs
from elastic.model.lora import init_lora_tensor, lora_tensor_specs

DTYPES = {"float32": torch.float32, "float64": torch.float64}
PEFT_PREFIX = "base_model.model."


@dataclass
class Reference:
    """What the reference run ends with: per-step losses, and every training tensor by our names."""

    losses: list[float] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: list[list[int]] = field(default_factory=list)  # the global indices each step trained on
    metrics: list[dict[str, float]] = field(default_factory=list)  # GRPO: what TRL logs at each step


def lr_factor(step: int, cfg: Config) -> float:
    """Warmup from lr/warmup to lr over ``warmup_steps``, then a half cosine down to ``min_lr_ratio * lr``."""
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    span = max(1, cfg.train.steps - o.warmup_steps)
    t = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * (1 + math.cos(math.pi * t)) / 2


def step_positions(step: int, batch: int) -> range:
    """The training positions step ``step`` consumes (DESIGN.md, "Data cursor")."""
    return range(step * batch, (step + 1) * batch)


def our_name(peft_name: str) -> str:
    """PEFT's name to ours: ``base_model.model.<x>.base_layer.weight`` -> ``<x>.weight``, and
    ``...lora_A.default.weight`` -> ``...lora_A.weight``."""
    return peft_name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".").replace(".default.", ".")


class SeededDropout(torch.nn.Module):
    """LoRA dropout by the rule in ``docs/design.md`` (no RNG state), in place of PEFT's ``nn.Dropout``.

    In a training forward of step ``s`` whose rows are the global samples ``samples``, row ``i`` of the
    adapter input of module ``m`` is multiplied by ``(torch.rand(row shape) >= p) / (1 - p)``, drawn in float32
    from a generator seeded by ``stable_seed(seed, "lora_dropout", s, samples[i], m)``. ``rows`` (class-wide)
    is (step, samples) while the training loop runs a forward, else None (no dropout).
    """

    rows: tuple[int, list[int]] | None = None

    def __init__(self, p: float, seed: int, module: str) -> None:
        super().__init__()
        self.p, self.seed, self.module = p, seed, module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if SeededDropout.rows is None:
            return x
        step, samples = SeededDropout.rows
        masks = []
        for sample in samples:
            gen = torch.Generator().manual_seed(stable_seed(self.seed, "lora_dropout", step, sample, self.module))
            masks.append(torch.rand(tuple(x.shape[1:]), generator=gen, dtype=torch.float32) >= self.p)
        return x * (torch.stack(masks).to(x.dtype) / (1 - self.p))


def build_model(cfg: Config) -> torch.nn.Module:
    """The model at step 0; with LoRA, wrapped by PEFT.

    From a Hugging Face folder (``train.init_from``), our decoder holds the weights transformers
    loads from it (``AutoModelForCausalLM``, not our loader). It is our decoder rather than
    transformers' model because transformers computes RoPE in float32 whatever the model's dtype,
    which moves a float64 run by ~1e-4 after a few steps; ``tests/unit/test_families.py`` checks our
    decoder's logits against transformers' per family. Otherwise our decoder with its seeded
    initial weights.
    """
    dtype = DTYPES[cfg.train.dtype]
    model = LlamaStage(cfg.model).to(dtype)
    if cfg.train.init_from:
        import transformers

        theirs = transformers.AutoModelForCausalLM.from_pretrained(cfg.train.init_from, dtype=dtype).state_dict()
        if cfg.model.tie_embeddings:
            theirs.pop("lm_head.weight")
        model.load_state_dict(theirs, strict=True)
    else:
        specs = {s.name: s for s in tensor_specs(cfg.model)}
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(init_tensor(specs[name], cfg.model, cfg.train.seed, dtype))
    if cfg.lora is None:
        return model
    import peft

    lora = cfg.lora
    model = peft.get_peft_model(model, peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                       target_modules=list(lora.targets), use_rslora=lora.use_rslora))
    if lora.dropout > 0:
        for name, module in model.named_modules():
            if hasattr(module, "lora_dropout"):  # a PEFT LoRA layer: its ModuleDict of adapter dropouts
                module.lora_dropout["default"] = SeededDropout(lora.dropout, cfg.train.seed, our_name(name))
    initial = {s.name: s for s in lora_tensor_specs(cfg.model, lora)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            ours = our_name(name)
            if ours in initial:  # A from our seeded init; B is zero in both
                p.copy_(init_lora_tensor(initial[ours], lora, cfg.train.seed, dtype))
    return model


def adamw(named: list[tuple[str, torch.nn.Parameter]], cfg: Config) -> torch.optim.AdamW:
    """torch's AdamW with two groups: matrices decay, vectors (norm weights) do not."""
    o = cfg.optim
    decay = [p for n, p in named if p.ndim >= 2 and not n.endswith("norm.weight")]
    rest = [p for n, p in named if not (p.ndim >= 2 and not n.endswith("norm.weight"))]
    groups = [g for g in ({"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0})
              if g["params"]]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=False)


def tensors_of(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Parameters and AdamW moments by our names (``<param>::exp_avg``, ``<param>::exp_avg_sq``)."""
    out = {}
    for name, p in model.named_parameters():
        ours = our_name(name)
        out[ours] = p.detach().clone()
        if p.requires_grad:
            state = opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{ours}::{key}"] = state[key].clone() if key in state else torch.zeros_like(p)
    return out


def update(named, opt: torch.optim.Optimizer, schedule, cfg: Config) -> None:
    """One optimizer step after the backward pass: clip the global norm, step AdamW and the schedule."""
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.optim.grad_clip)
    opt.step()
    schedule.step()
    opt.zero_grad(set_to_none=True)


def train_reference(cfg: Config, steps: int | None = None) -> Reference:
    """``steps`` optimizer steps (default ``cfg.train.steps``) of next-token prediction on the whole batch."""
    torch.manual_seed(0)  # nothing here draws from it; a stray draw would show as a mismatch, not pass silently
    model = build_model(cfg)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = adamw(named, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    dataset = build_dataset(cfg.data, cfg.train.seed)
    order = GlobalSampler(len(dataset), cfg.train.global_batch, cfg.train.seed)
    mixed = cfg.train.mixed_precision == "bf16"
    out = Reference()
    for step in range(cfg.train.steps if steps is None else steps):
        indices = [order.index_at(p) for p in step_positions(step, cfg.train.global_batch)]
        x, y = dataset.batch(indices)
        SeededDropout.rows = (step, indices)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
                logits = model(x)
        finally:
            SeededDropout.rows = None
        if mixed:
            logits = logits.float()
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100,
                                reduction="sum")
        loss = total / (y != -100).sum()
        loss.backward()
        update(named, opt, schedule, cfg)
        out.losses.append(float(loss.detach()))
        out.samples.append(sorted(indices))
    out.tensors = tensors_of(model, opt)
    return out


_CACHE: dict[tuple[str, int | None], Reference] = {}


def cached_reference(cfg: Config, steps: int | None = None) -> Reference:
    """``train_reference(cfg, steps)`` computed once per test session for each (config, steps): several tests
    compare against the same run (a copy is returned, so no test can change another's reference). Keyed on the
    config's repr, which names every field (``Config`` holds a dict, so it does not hash). The reference's own
    tests call ``train_reference`` itself (its determinism is one of their checks)."""
    key = (repr(cfg), steps)
    if key not in _CACHE:
        _CACHE[key] = train_reference(cfg, steps)
    ref = _CACHE[key]
    return Reference(list(ref.losses), {k: v.clone() for k, v in ref.tensors.items()},
                     [list(s) for s in ref.samples], [dict(m) for m in ref.metrics])


# ---- Sampling --------------------------------------------------------------------------------------

def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering of one distribution [V]: the most probable tokens, in order, while the mass
    before each is below ``top_p`` (so always the top one), renormalised; the rest get 0."""
    if top_p >= 1:
        return probs
    values = probs.tolist()
    kept, mass = [0.0] * len(values), 0.0
    for token in sorted(range(len(values)), key=lambda t: -values[t]):
        if mass >= top_p:
            break
        kept[token] = values[token]
        mass += values[token]
    kept = torch.tensor(kept, dtype=probs.dtype)
    return kept / kept.sum()


def categorical(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One draw from ``probs`` [V] (unnormalised is fine): the exponential race, argmax_i p_i / E_i with
    E_i ~ Exp(1) i.i.d., is distributed as p (Gumbel-max after a log). ``torch.multinomial`` draws one
    sample by the same race, so from the same generator state both pick the same token; the test of
    this definition against the frequencies it should give is ``tests/unit/test_sampling.py``."""
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return int((probs / race).argmax())


@torch.no_grad()
def reference_sample(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, temperature: float,
                     top_p: float, stop_ids: tuple[int, ...], generator: torch.Generator) -> list[int]:
    """One completion of ``prompt``, each token from a full forward of the prompt and the tokens so far
    (no KV cache, no padding, no batch-mates): greedy at temperature 0, else softmax(logits / T) in
    float64, then top-p, then a categorical draw. The new tokens, up to and including the first stop."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids]))[0, -1].double()
        if temperature == 0:
            token = int(logits.argmax())
        else:
            token = categorical(top_p_filter(torch.softmax(logits / temperature, -1), top_p), generator)
        ids.append(token)
        if token in stop_ids:
            break
    return ids[len(prompt):]


# ---- GRPO ------------------------------------------------------------------------------------------

def trl_advantages(rewards: torch.Tensor, group: int, scale_rewards: str) -> torch.Tensor:
    """TRL's GRPOTrainer advantages: reward minus its group's mean, over (std + 1e-4) when scaling."""
    grouped = rewards.view(-1, group)
    centred = (grouped - grouped.mean(1, keepdim=True)).reshape(-1)
    if scale_rewards == "none":
        return centred
    std = grouped.std(1).repeat_interleave(group) if scale_rewards == "group" else rewards.std().expand_as(rewards)
    return centred / (std + 1e-4)


def trl_rollout_metrics(per_func: dict[str, list[float]], rewards: torch.Tensor, lengths: torch.Tensor,
                        clipped: torch.Tensor) -> dict[str, float]:
    """TRL's ``_generate_and_score_completions`` logs: the rewards' mean and std (Bessel's, as TRL's nanstd),
    each function's over the completions it scored (None left out), and the completion lengths."""
    def mean_std(values: list[float]) -> tuple[float, float]:
        kept = torch.tensor([v for v in values if not math.isnan(v)], dtype=torch.float64)
        return float(kept.mean()), float(kept.std()) if len(kept) > 1 else math.nan

    out = dict(zip(("reward", "reward_std"), mean_std(rewards.tolist()), strict=True))
    for name, values in per_func.items():
        out[f"rewards/{name}/mean"], out[f"rewards/{name}/std"] = mean_std(values)
    out.update({"completions/mean_length": float(lengths.double().mean()),
                "completions/min_length": float(lengths.min()), "completions/max_length": float(lengths.max()),
                "completions/clipped_ratio": float(clipped.double().mean())})
    return out


def trl_step_metrics(logps: torch.Tensor, old: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
                     epsilon: float, epsilon_high: float | None, entropy: torch.Tensor,
                     kl: torch.Tensor | None = None) -> dict[str, float]:
    """TRL's ``_compute_loss`` logs (token-level ratio): the masked means of the entropy and of the low, high and
    region clip indicators, and with beta > 0 of the k3 KL (``kl``, per token)."""
    old = logps.detach() if old is None else old
    coef_1, adv, m = torch.exp(logps.detach() - old), advantages.unsqueeze(1), mask.double()
    low = (coef_1 < 1 - epsilon) & (adv < 0)
    high = (coef_1 > 1 + (epsilon if epsilon_high is None else epsilon_high)) & (adv > 0)
    tokens = m.sum().clamp(min=1.0)
    out = {"entropy": float((entropy * m).sum() / tokens), "clip_ratio/low_mean": float((low * m).sum() / tokens),
           "clip_ratio/high_mean": float((high * m).sum() / tokens),
           "clip_ratio/region_mean": float(((low | high) * m).sum() / tokens)}
    if kl is not None:
        out["kl"] = float((kl.detach() * m).sum() / tokens)
    return out


def trl_loss(logps: torch.Tensor, old: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
             epsilon: float, epsilon_high: float | None, loss_type: str, max_completion_length: int,
             keep: torch.Tensor | None = None, kl: torch.Tensor | None = None, beta: float = 0.0) -> torch.Tensor:
    """TRL's ``_compute_loss`` for one process and the whole batch; ``keep``: TRL's high-entropy token mask
    (``top_entropy_quantile``), None for every token; ``kl``: the per-token k3 KL to the reference model
    (``trl_kl``), added with weight ``beta`` after the mask, as TRL adds it."""
    old = logps.detach() if old is None else old
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + (epsilon if epsilon_high is None else epsilon_high))
    adv = advantages.unsqueeze(1).to(logps.dtype)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    if keep is not None:
        per_token = per_token * keep.to(per_token.dtype)
    if beta != 0:
        per_token = per_token + beta * kl
    mask = mask.to(logps.dtype)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo" or loss_type == "dapo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    raise ValueError(f"loss_type {loss_type!r}")


def completion_logps(model: torch.nn.Module, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Log-probs [B, C] of the tokens after the prompt."""
    logits = model(ids)[:, prompt_len - 1 : -1]
    return torch.gather(F.log_softmax(logits, dim=-1), -1, ids[:, prompt_len:].unsqueeze(-1)).squeeze(-1)


def row_logps(model: torch.nn.Module, prompts: list[list[int]], tokens: torch.Tensor) -> torch.Tensor:
    """Completion log-probs [B, C], each row computed alone on its own unpadded prompt."""
    return torch.cat([completion_logps(model, torch.cat([torch.tensor([p]), tokens[r : r + 1]], dim=1), len(p))
                      for r, p in enumerate(prompts)])


def policy_logps(model: torch.nn.Module, prompts: list[list[int]], tokens: torch.Tensor, step: int,
                 completions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy step's forward, each row alone on its own unpadded prompt: completion log-probs [B, C] (with
    gradient) and the entropy [B, C] of each position's next-token distribution (detached), from the same
    forward as TRL takes them. LoRA dropout acts here, row ``r`` named by its global completion index
    ``completions[r]`` in optimizer step ``step`` (``SeededDropout``); nothing else in GRPO has dropout."""
    logps, entropies = [], []
    for r, p in enumerate(prompts):
        SeededDropout.rows = (step, [completions[r]])
        try:
            logits = model(torch.cat([torch.tensor([p]), tokens[r : r + 1]], dim=1))[:, len(p) - 1 : -1]
        finally:
            SeededDropout.rows = None
        every = F.log_softmax(logits, dim=-1)
        logps.append(torch.gather(every, -1, tokens[r : r + 1].unsqueeze(-1)).squeeze(-1))
        entropies.append(-(every.exp() * every).sum(-1).detach())
    return torch.cat(logps), torch.cat(entropies)


def trl_kl(logps: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """TRL's per-token k3 estimate of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1."""
    return torch.exp(ref - logps) - (ref - logps) - 1


def noisy_rewards(clean: torch.Tensor, prompts: list[int], group: int, grpo_step: int, seed: int, rho_plus: float,
                  rho_minus: float) -> torch.Tensor:
    """The simulated verifier's observed rewards, by its definition (``docs/grpo_noise.md``): completion ``s`` of
    prompt ``i`` in GRPO step ``k`` draws u = stable_seed(seed, "reward-noise", "train", k, i, s) / 2**63; a true 1
    becomes 0 when u < rho_minus, a true 0 becomes 1 when u < rho_plus."""
    out = clean.clone()
    for r, value in enumerate(clean.tolist()):
        i, s = prompts[r // group], r % group
        u = stable_seed(seed, "reward-noise", "train", grpo_step, i, s) / float(2**63)
        if math.isnan(value):  # unscored (None from every function): stays unscored
            continue
        assert value in (0.0, 1.0), f"the flip channel takes 0/1 rewards, got {value}"
        if u < (rho_minus if value == 1 else rho_plus):
            out[r] = 1 - value
    return out


def user_function(spec: str):
    """A user's reward function from ``package.module:function``, imported by name; a module of elastic is
    refused, so that the reference cannot reach our training code this way."""
    import importlib

    module, _, name = spec.strip().partition(":")
    if module.split(".")[0] == "elastic":
        raise ValueError(f"{spec}: the reference imports no module of elastic by name; reward functions are the "
                         "user's (e.g. tests.helpers)")
    return getattr(importlib.import_module(module), name)


def train_grpo_reference(cfg: Config, reward_fn, steps: int | None = None) -> Reference:
    """GRPO as one process would run it: sample each prompt's completions (``reference_sample``, seeded per global
    prompt and sample), score them with ``reward_fn`` (with ``inject_noise``, through the flip channel:
    ``noisy_rewards``), TRL's advantages and loss (with beta > 0, its k3 KL to the reference model, which under
    LoRA is the frozen base: PEFT's ``disable_adapter``), torch's AdamW. No noise correction."""
    from elastic.core.tokenizer import load_tokenizer
    from elastic.recipes.grpo.config import GRPOConfig
    from elastic.recipes.grpo.prompts import PromptTask
    from elastic.recipes.grpo.rewards import build_task

    g = GRPOConfig.of(cfg)
    assert g.correction == "none" and not (g.group_rates or g.rate_group or g.estimate_rates), "not covered here"
    assert g.beta == 0 or cfg.lora is not None, "beta > 0 needs a reference model: LoRA's frozen base"
    model = build_model(cfg)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = adamw(named, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    tok = load_tokenizer(cfg.data.tokenizer)
    if g.prompts:  # users' prompts: each group sampled and scored at its own length, never padded
        task = PromptTask.from_file(g.prompts, tok, g.max_new_tokens, cfg.model.max_seq_len)
        prompt_of = task.ids
    else:
        task = build_task(g.task, cfg.data.seq_len, cfg.data.num_samples, cfg.train.seed)
        prompt_of = task.prompt_ids
    order = GlobalSampler(len(task), cfg.train.global_batch, cfg.train.seed)
    out, G = Reference(), g.num_generations
    for step in range(cfg.train.steps if steps is None else steps):
        k, iteration = divmod(step, g.num_iterations)
        if iteration == 0:
            prompts = [order.index_at(p) for p in step_positions(k, cfg.train.global_batch)]
            rows, tokens, lengths = [], [], []
            for i in prompts:  # one completion at a time, seeded by (step, prompt, sample), never padded
                for s in range(G):
                    gen = torch.Generator().manual_seed(stable_seed(cfg.train.seed, "rollout", k, i, s))
                    new = reference_sample(model, prompt_of(i), g.max_new_tokens, g.temperature, g.top_p,
                                           (tok.eos_id,), gen)
                    rows.append(prompt_of(i))
                    lengths.append(len(new))  # after the stop: its token again, masked out of the loss
                    tokens.append(new + new[-1:] * (g.max_new_tokens - len(new)))
            tokens, lengths = torch.tensor(tokens), torch.tensor(lengths)
            completions = [tok.decode(tokens[r, : int(lengths[r])]) for r in range(len(rows))]
            if g.reward_funcs:  # TRL's convention: each function once on the batch, extra columns as keywords
                indices = [i for i in prompts for _ in range(G)]
                columns = {c: [task.rows[i][c] for i in indices] for c in task.columns}
                ids_out = [tokens[r, : int(lengths[r])].tolist() for r in range(len(rows))]
                per_func = {}
                for spec in g.reward_funcs.split(","):
                    fn = user_function(spec)
                    chats = [task.rows[i]["prompt"] for i in indices]  # TRL: a chat prompt's completion is messages
                    shaped = [[{"role": "assistant", "content": c}] if isinstance(p, list) else c
                              for p, c in zip(chats, completions, strict=True)]
                    values = fn(prompts=chats, completions=shaped, completion_ids=ids_out, **columns)
                    per_func[fn.__name__] = [math.nan if v is None else float(v) for v in values]
                rewards = torch.tensor(list(per_func.values()), dtype=torch.float64).nansum(0)  # None does not count
            else:
                texts = [task.problem(i).prompt for i in prompts for _ in range(G)]
                rewards = torch.tensor([float(reward_fn(text, completions[r])) for r, text in enumerate(texts)],
                                       dtype=torch.float64)
            if g.inject_noise:  # what the (simulated) verifier reports
                rewards = noisy_rewards(rewards, prompts, G, k, cfg.train.seed, g.rho_plus, g.rho_minus)
            if g.reward_funcs:
                clipped = torch.tensor([int(tokens[r, int(lengths[r]) - 1]) != tok.eos_id for r in range(len(rows))])
                rollout_metrics = trl_rollout_metrics(per_func, rewards, lengths, clipped)
            advantages = trl_advantages(rewards, G, g.scale_rewards)
            mask = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
            with torch.no_grad():  # TRL: the old and reference log-probs once per generated batch, no dropout
                old = row_logps(model, rows, tokens) if g.num_iterations > 1 else None
                ref = None
                if g.beta > 0:
                    with model.disable_adapter():
                        ref = row_logps(model, rows, tokens)
            numbered = [i * G + s for i in prompts for s in range(G)]  # global completion indices
            out.samples.append(prompts)
        logps, entropy = policy_logps(model, rows, tokens, step, numbered)
        kl = None if ref is None else trl_kl(logps, ref)
        keep = None
        if g.reward_funcs:
            out.metrics.append({**rollout_metrics, **trl_step_metrics(logps, old, advantages, mask, g.epsilon,
                                                                      g.epsilon_high, entropy, kl)})
        if g.top_entropy_quantile < 1:  # TRL: entropies of the whole batch, threshold at their quantile in float32
            threshold = torch.quantile(entropy[mask].float(), 1 - g.top_entropy_quantile)
            keep = ((entropy * mask) >= threshold) & mask
        loss = trl_loss(logps, old, advantages, mask, g.epsilon, g.epsilon_high, g.loss_type, g.max_new_tokens,
                        keep, kl, g.beta)
        loss.backward()
        update(named, opt, schedule, cfg)
        out.losses.append(float(loss.detach()))
    out.tensors = tensors_of(model, opt)
    return out
