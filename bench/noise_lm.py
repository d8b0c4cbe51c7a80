"""The language-model confirmation of noise-corrected GRPO (``bench/grpo_noise.py --lm``): does a correction
beat a matched task weight, with every arm at its own best learning rate?

The policy: the 'mini' model trained with supervision until both built-in task types (arithmetic and
sort_digits) start at 30-60% sampled accuracy (``sft_calibrated``: a task stops being trained once it
reaches 30%; cached under ``runs/bench_grpo_noise/``). GRPO then runs on the built-in ``mixed`` task with
TRL's Dr. GRPO loss (loss_type and scale_rewards "none"), G = 8, LoRA r = 16 and AdamW. The rewards pass a
flip channel whose rates differ by task (arithmetic J = 0.9, sort_digits J = 0.4); the corrections use rates
estimated per task from the recipe's gold-labelled calibration (``estimate_rates``, ``rate_group = "task"``).
Arms, paired by seed (same prompts, sampling seeds and flips):

- noisy: uncorrected;
- corrected: dr_grpo with per-task estimated rates (a task weight 1/J^_g);
- sort weight: uncorrected, with sort_digits' advantages times J_arith / J_sort (the correction's relative
  weight between the two tasks, from the true rates), so only the correction's *extra* effect remains;
- posterior: the posterior correction with per-task estimated rates.

Each arm runs at lr in {5e-4, 1e-3, 2e-3} and 5 seeds; its lr is chosen on 1,000 validation problems per task
and reported on 1,000 disjoint test problems per task (sampled accuracy at temperature 1, one seeded sample
per problem, the same for every arm), with paired t-intervals. About 40 minutes on 2 cores (not run for the
note); ``--quick`` runs a tiny version that only checks the machinery. The GRPO math is the recipe's own
(``GRPOLoop``); rollouts and updates run in this process rather than on Ray workers.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from noise_gradient import ROOT, TASKS, TRUE_RATES, tasks  # bench/ is on sys.path
from noise_stats import Contrast

from elastic.core.config import MODEL_PRESETS
from elastic.core.seeds import stable_seed
from elastic.core.tokenizer import EOS, ByteTokenizer
from elastic.model.generate import SamplingConfig, sample
from elastic.model.hf import load_hf_model, save_hf_model
from elastic.model.llama import LlamaStage
from elastic.model.lora import apply_lora
from elastic.recipes.grpo.loop import GRPOLoop
from elastic.recipes.grpo.loss import grpo_loss
from elastic.recipes.grpo.recipe import grpo_config
from elastic.recipes.grpo.worker import rollout_batch, token_logps

GROUP_RATES = ",".join(f"{n}={r.rho_plus}:{r.rho_minus}" for n, r in TRUE_RATES.groups.items())
SORT_WEIGHT = TRUE_RATES.of("arithmetic").scale / TRUE_RATES.of("sort_digits").scale  # 0.9 / 0.4
LRS = (5e-4, 1e-3, 2e-3)
ARMS = {  # name -> (GRPO knobs, weight of sort_digits' advantages)
    "noisy": (dict(group_rates=GROUP_RATES), 1.0),
    "corrected": (dict(group_rates=GROUP_RATES, correction="dr_grpo", estimate_rates=True), 1.0),
    "sort weight": (dict(group_rates=GROUP_RATES), SORT_WEIGHT),
    "posterior": (dict(group_rates=GROUP_RATES, correction="posterior", estimate_rates=True), 1.0),
}
START = (0.30, 0.60)  # the sampled accuracy both tasks should start GRPO at


def holdout_problems(n: int, offset: int = 0):
    """Up to ``n`` distinct held-out problems per task (arithmetic has about 2,000 in all), from index ``offset``."""
    out = {}
    for name, task in tasks().items():
        seen, i = {}, offset
        while len(seen) < n and i < offset + 20 * n:
            p = task.problem(i, "holdout")
            seen.setdefault(p.prompt, p)
            i += 1
        out[name] = list(seen.values())
    return out


@torch.no_grad()
def accuracy(model, problems, temperature: float = 1.0) -> dict[str, float]:
    """Exact-match accuracy per task, one sample per problem seeded by the problem (the same for every arm)."""
    tok, out = ByteTokenizer(), {}
    model.eval()
    for name, items in problems.items():
        correct = 0
        for lo in range(0, len(items), 512):
            batch = items[lo : lo + 512]
            ids = torch.tensor([tok.encode(p.prompt, bos=True) for p in batch])
            gens = [torch.Generator().manual_seed(stable_seed("lm-eval", p.prompt)) for p in batch]
            tokens, lengths = sample(model, ids, SamplingConfig(8, temperature, 1.0, (EOS,)), gens)
            correct += sum(tok.decode(tokens[r, : int(lengths[r])]).strip() == p.answer for r, p in enumerate(batch))
        out[name] = correct / len(items)
    return out


def sft_calibrated(max_steps: int, log, chunk: int = 25) -> LlamaStage:
    """The 'mini' model trained until both tasks' sampled accuracy reaches START[0] (a task that has stops being
    trained, so neither overshoots by more than a chunk); cached as a HF folder. Logs where it ended."""
    folder = ROOT / "runs" / "bench_grpo_noise" / f"sft-start-{START[0]:g}-{START[1]:g}-{max_steps}"
    torch.manual_seed(0)
    model = LlamaStage(MODEL_PRESETS["mini"])
    check = {n: v[:256] for n, v in holdout_problems(256, offset=4000).items()}  # not the val/test problems
    if (folder / "config.json").is_file():
        model.load_state_dict(load_hf_model(folder)[1], strict=False)
        log(f"reusing the SFT policy in {folder}: sampled accuracy {accuracy(model, check)}")
        return model.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    data, step, started = tasks(), 0, time.perf_counter()
    acc = accuracy(model, check)
    while step < max_steps:
        train = [t for t in TASKS if acc[t] < START[0]]
        if not train:
            break
        model.train()
        for _ in range(chunk):
            rows = [data[train[i % len(train)]].sample(step * 64 + i) for i in range(64)]
            inputs, labels = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
            loss = F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten(), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        acc = accuracy(model, check)
    inside = all(START[0] <= acc[t] <= START[1] for t in TASKS)
    log(f"SFT: {step} steps in {time.perf_counter() - started:.0f} s, sampled accuracy "
        + ", ".join(f"{t} {acc[t]:.1%}" for t in TASKS)
        + ("" if inside else f" (NOT both in {START[0]:.0%}-{START[1]:.0%}: the GRPO start is off target)"))
    save_hf_model(folder, MODEL_PRESETS["mini"], dict(model.state_dict()))
    return model.eval()


def run_arm(policy, knobs: dict, sort_weight: float, lr: float, seed: int, steps: int):
    """One GRPO run from the SFT policy; returns the trained model (LoRA on a copy of the policy)."""
    knobs = dict(task="mixed", rate_group="task", loss_type="dr_grpo", scale_rewards="none", num_generations=8,
                 max_new_tokens=6, calibration_size=1024, **knobs)
    cfg = grpo_config(steps=steps, workers=1, prompts_per_step=16, lr=lr, lora=True, seed=seed, **knobs)
    loop = GRPOLoop(cfg)
    torch.manual_seed(seed)  # the adapters' init (PEFT's: B = 0, so every arm starts at the SFT policy)
    model = apply_lora(copy.deepcopy(policy), cfg.lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sampling = SamplingConfig(knobs["max_new_tokens"], 1.0, 1.0, (EOS,))
    for k in range(steps):
        prompts = loop.prompts(k)
        ids, mask, gens = rollout_batch(prompts, 8, seed, k)  # the workers' own batch and generators
        model.eval()
        tokens, lengths = sample(model, ids, sampling, gens, prompt_mask=mask)
        batch = loop.build(k, [{"prompts": [i for i, _, _ in prompts], "tokens": tokens, "lengths": lengths}])
        advantages = batch.rows["advantages"]
        if sort_weight != 1.0:  # a task weight: sort_digits' advantages scaled against arithmetic's
            task = [loop.group_of(loop.task.row(i)) for i in batch.prompts for _ in range(8)]
            advantages = advantages * torch.tensor([sort_weight if t == "sort_digits" else 1.0 for t in task],
                                                   dtype=advantages.dtype)
        model.train()
        logps = token_logps(model, batch.rows["input_ids"], ids.shape[1], batch.rows["prompt_mask"])
        loss, _ = grpo_loss(logps, advantages, batch.rows["mask"], loss_type="dr_grpo",
                            max_completion_length=knobs["max_new_tokens"])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # the recipe's
        opt.step()
    return model


def _mean_ci(values: list[float]) -> str:
    c = Contrast("", values)
    lo, hi = c.interval(0.05)
    return f"{c.mean:.1%} [{lo:.1%}, {hi:.1%}]"


def run(quick: bool, log=print, plot_path=None) -> str:
    """Every arm at every lr and seed; lr chosen on validation, reported on test. Printed and returned."""
    torch.set_num_threads(2)
    seeds, steps, n_eval, lrs, sft_steps = (2, 4, 60, LRS[1:], 50) if quick else (5, 150, 1000, LRS, 3000)
    policy = sft_calibrated(sft_steps, log)
    pool = holdout_problems(2 * n_eval)
    val = {t: v[: len(v) // 2] for t, v in pool.items()}  # disjoint halves of distinct problems
    test = {t: v[len(v) // 2 :] for t, v in pool.items()}
    start = {"val": accuracy(policy, val), "test": accuracy(policy, test)}
    scores = {}  # (arm, lr) -> {"val": [per seed mean over tasks], "test": [per seed {task: acc}]}
    started = time.perf_counter()
    for name, (knobs, weight) in ARMS.items():
        for lr in lrs:
            got = scores.setdefault((name, lr), {"val": [], "test": []})
            for seed in range(seeds):
                model = run_arm(policy, knobs, weight, lr, seed, steps)
                v, t = accuracy(model, val), accuracy(model, test)
                got["val"].append(sum(v.values()) / len(v))
                got["test"].append(t)
                log(f"{name:<12} lr {lr:g} seed {seed}: val {got['val'][-1]:.1%}, test "
                    + ", ".join(f"{k} {t[k]:.1%}" for k in TASKS) + f"   ({time.perf_counter() - started:.0f} s)")
    chosen = {name: max(lrs, key=lambda lr, n=name: sum(scores[(n, lr)]["val"])) for name in ARMS}
    sizes = {t: (len(val[t]), len(test[t])) for t in TASKS}
    lines = ["Language model: GRPO from the SFT policy (sampled test accuracy before: "
             + ", ".join(f"{t} {start['test'][t]:.1%}" for t in TASKS) + f"), {steps} steps x 16 prompts x 8, "
             f"{seeds} paired seeds, lr in {list(lrs)} chosen on validation (mean of the tasks); problems per task "
             f"(val, test) {sizes}; verifier noise arithmetic J = 0.9, sort_digits J = 0.4, rates estimated per task.",
             f"{'arm':<12}{'chosen lr':>10}  " + "".join(f"{t + ' test [95% t]':<30}" for t in (*TASKS, "mean"))]
    per_arm = {}
    for name in ARMS:
        runs = scores[(name, chosen[name])]["test"]
        per_arm[name] = {t: [r[t] for r in runs] for t in TASKS}
        per_arm[name]["mean"] = [sum(r.values()) / len(r) for r in runs]
        lines.append(f"{name:<12}{chosen[name]:>10g}  " + "".join(f"{_mean_ci(per_arm[name][t]):<30}"
                                                                 for t in (*TASKS, "mean")))
    lines.append("paired differences on test, each arm at its chosen lr (mean [95% t-interval], unadjusted):")
    verdict = []
    for corr in ("corrected", "posterior"):
        for ref in ("noisy", "sort weight"):
            for t in (*TASKS, "mean"):
                c = Contrast(f"{corr} - {ref}", [a - b for a, b in zip(per_arm[corr][t], per_arm[ref][t], strict=True)])
                lo, hi = c.interval(0.05)
                lines.append(f"  {c.name:<26}{t:<13}{c.mean:+.2%} [{lo:+.2%}, {hi:+.2%}]")
                if t == "mean":
                    verdict.append((corr, ref, lo > 0))
    for corr in ("corrected", "posterior"):
        wins = all(ok for c, _, ok in verdict if c == corr)
        lines.append(f"VERDICT (LM) {corr}: " + ("beats both noisy and the matched sort weight on the test mean"
                                                  if wins else "does not beat both noisy and the matched sort weight "
                                                  "(interval of the test mean includes or lies below 0)"))
    if quick:
        lines.append("(--quick: a tiny machinery check, not evidence: few steps, seeds and problems)")
    return "\n".join(lines)
