"""The language-model experiment of noise-corrected GRPO: does correcting for per-task verifier noise
raise held-out accuracy, on the task whose verifier is noisier?

The policy is the supervised 'mini' model of ``noise_gradient.py`` (arithmetic and sort_digits). GRPO
runs on the built-in ``mixed`` task with TRL's Dr. GRPO loss (loss_type and scale_rewards "none"),
G = 8, LoRA r = 16 (its frozen base, the SFT policy, is the KL reference) with AdamW. The rewards
pass a flip channel whose rates differ by task (arithmetic J = 0.9, sort_digits J = 0.4); the
corrections use rates estimated per task from the recipe's gold-labelled calibration
(``estimate_rates``, ``rate_group = "task"``). Arms, paired by seed (same prompts, same sampling
seeds, same flips):

- clean: the true reward;             - noisy: uncorrected;
- corrected: dr_grpo with per-task estimated rates;
- matched-LR: uncorrected at lr / mean(J) (the correction's average scale, as a plain LR change);
- with a KL penalty (beta > 0) to the SFT policy: noisy and corrected again.

The GRPO math is the recipe's own (``GRPOLoop``: prompts, rewards, noise, rates, advantages; the loss
in ``recipes/grpo/loss.py``); the rollouts and updates run in this process instead of on Ray
workers, because this measures the algorithm, and the layout invariance of the same math is tested
elsewhere. Accuracy is greedy exact match on held-out problems of each type (disjoint from training).
"""

from __future__ import annotations

import copy
import math
import time

import torch
from noise_gradient import TASKS, TRUE_RATES, sft_policy, tasks  # bench/ is on sys.path

from elastic.core.tokenizer import EOS, ByteTokenizer
from elastic.model.generate import SamplingConfig, sample
from elastic.model.lora import apply_lora
from elastic.recipes.grpo.loop import GRPOLoop
from elastic.recipes.grpo.loss import grpo_loss
from elastic.recipes.grpo.recipe import grpo_config
from elastic.recipes.grpo.worker import rollout_batch, token_logps

GROUP_RATES = ",".join(f"{n}={r.rho_plus}:{r.rho_minus}" for n, r in TRUE_RATES.groups.items())
MEAN_J = sum(r.scale for r in TRUE_RATES.groups.values()) / len(TRUE_RATES.groups)
LR = 1e-3  # the GRPO recipe's default for LoRA
ARMS = {  # name -> (GRPO knobs, learning rate)
    "clean": (dict(rho_plus=0.0, rho_minus=0.0, inject_noise=False), LR),
    "noisy": (dict(group_rates=GROUP_RATES), LR),
    "corrected": (dict(group_rates=GROUP_RATES, correction="dr_grpo", estimate_rates=True), LR),
    "matched-LR": (dict(group_rates=GROUP_RATES), LR / MEAN_J),
    "noisy, beta": (dict(group_rates=GROUP_RATES, beta=0.04), LR),
    "corrected, beta": (dict(group_rates=GROUP_RATES, correction="dr_grpo", estimate_rates=True, beta=0.04), LR),
}


def holdout_problems(n: int):
    """Up to ``n`` distinct held-out problems per task (arithmetic has about 2,000 in all)."""
    out = {}
    for name, task in tasks().items():
        seen, i = {}, 0
        while len(seen) < n and i < 20 * n:
            p = task.problem(i, "holdout")
            seen.setdefault(p.prompt, p)
            i += 1
        out[name] = list(seen.values())
    return out


@torch.no_grad()
def accuracy(model, problems) -> dict[str, float]:
    tok, out = ByteTokenizer(), {}
    model.eval()
    for name, items in problems.items():
        correct = 0
        for lo in range(0, len(items), 512):
            batch = items[lo : lo + 512]
            ids = torch.tensor([tok.encode(p.prompt, bos=True) for p in batch])
            tokens, lengths = sample(model, ids, SamplingConfig(8, 0.0, 1.0, (EOS,)))
            correct += sum(tok.decode(tokens[r, : int(lengths[r])]).strip() == p.answer for r, p in enumerate(batch))
        out[name] = correct / len(items)
    return out


def run_arm(policy, knobs: dict, lr: float, seed: int, steps: int, problems, curve_problems, every: int):
    """One GRPO run; returns (final accuracy per task, [(step, accuracy per task)])."""
    knobs = dict(task="mixed", rate_group="task", loss_type="dr_grpo", scale_rewards="none", num_generations=8,
                 max_new_tokens=6, calibration_size=1024, **knobs)
    cfg = grpo_config(steps=steps, workers=1, prompts_per_step=16, lr=lr, lora=True, seed=seed, **knobs)
    loop, g = GRPOLoop(cfg), knobs
    torch.manual_seed(seed)  # the adapters' init (PEFT's: B = 0, so every arm starts at the SFT policy)
    model, reference = apply_lora(copy.deepcopy(policy), cfg.lora), policy
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sampling = SamplingConfig(g["max_new_tokens"], 1.0, 1.0, (EOS,))
    curve = []
    for k in range(steps):
        if k % every == 0:
            curve.append((k, accuracy(model, curve_problems)))
        prompts = loop.prompts(k)
        ids, mask, gens = rollout_batch(prompts, 8, seed, k)  # the workers' own batch and generators
        model.eval()
        tokens, lengths = sample(model, ids, sampling, gens, prompt_mask=mask)
        part = {"prompts": [i for i, _, _ in prompts], "tokens": tokens, "lengths": lengths}
        full = torch.cat([ids, tokens], dim=1)
        if g.get("beta"):
            with torch.no_grad():
                part["ref"] = token_logps(reference, full, ids.shape[1], mask)
        batch = loop.build(k, [part])
        model.train()
        logps = token_logps(model, batch.rows["input_ids"], ids.shape[1], batch.rows["prompt_mask"])
        loss, _ = grpo_loss(logps, batch.rows["advantages"], batch.rows["mask"], ref_logps=batch.rows.get("ref"),
                            beta=g.get("beta", 0.0), loss_type="dr_grpo", max_completion_length=g["max_new_tokens"])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)  # recipe's
        opt.step()
    curve.append((steps, accuracy(model, curve_problems)))
    return accuracy(model, problems), curve


def paired(values: dict, a: str, b: str, task: str) -> tuple[float, float]:
    diffs = [x[task] - y[task] for x, y in zip(values[a], values[b], strict=True)]
    mean = sum(diffs) / len(diffs)
    se = (math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) if len(diffs) > 1
          else float("nan"))
    return mean, se


def verdict(mean: float, se: float, cost: float, helps: bool | None) -> str:
    if math.isnan(se):
        return "one seed: no interval, no verdict"
    lo, hi = mean - 1.96 * se, mean + 1.96 * se
    if helps is None:  # AdamW does not make a per-group re-weighting an LR change: no prediction either way
        return f"no prediction: interval [{lo:+.3f}, {hi:+.3f}]"
    if not helps:
        return "PASS equal within the interval" if lo <= 0 <= hi else "FAIL predicted equal, differs"
    recovered = mean / cost if cost > 0 else float("nan")
    ok = lo > 0 and recovered >= 0.5
    return f"{'PASS' if ok else 'FAIL'} predicted to help: interval {'excludes' if lo > 0 else 'includes'} 0, " \
           f"recovers {recovered:.0%} of the noise's cost"


def run(quick: bool, log=print, plot_path=None) -> str:
    torch.set_num_threads(2)
    seeds, steps, n_eval = (1, 60, 500) if quick else (5, 150, 2000)
    policy = sft_policy(300 if quick else 600, log)
    problems, curve_problems = holdout_problems(n_eval), holdout_problems(200)
    finals, curves = {a: [] for a in ARMS}, {a: [] for a in ARMS}
    started = time.perf_counter()
    for seed in range(seeds):
        for name, (knobs, lr) in ARMS.items():
            final, curve = run_arm(policy, knobs, lr, seed, steps, problems, curve_problems, every=max(steps // 6, 1))
            finals[name].append(final)
            curves[name].append(curve)
            log(f"seed {seed} {name:<16} " + "  ".join(f"{t} {final[t]:.1%}" for t in TASKS)
                + f"   ({time.perf_counter() - started:.0f} s)")
    before = accuracy(policy, problems)
    sizes = {t: len(problems[t]) for t in TASKS}
    lines = [f"Language model: GRPO from the SFT policy ({', '.join(f'{t} {before[t]:.1%}' for t in TASKS)} before), "
             f"{steps} steps x 16 prompts x 8, {seeds} paired seed(s), held-out problems {sizes}; verifier noise "
             "arithmetic J = 0.9, sort_digits J = 0.4, rates estimated per task.",
             f"{'arm':<18}" + "".join(f"{t:>16}" for t in TASKS)]
    for name in ARMS:
        cells = []
        for t in TASKS:
            vals = [f[t] for f in finals[name]]
            mean = sum(vals) / len(vals)
            se = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) / len(vals)) if len(vals) > 1 else 0
            cells.append(f"{mean:>10.1%} ±{se:.1%}")
        lines.append(f"{name:<18}" + "".join(f"{c:>16}" for c in cells))
    lines.append("paired differences (mean ± se over seeds) and verdicts:")
    # The theory predicts a gain on the noisier type (sort_digits) from per-task rates, and on both with beta > 0;
    # on arithmetic (J = 0.9, the cleaner type) per-task correction predicts little change, so no verdict there.
    predictions = {("corrected", "noisy"): {"sort_digits": True, "arithmetic": None},
                   ("corrected", "matched-LR"): {"sort_digits": None, "arithmetic": None},
                   ("corrected, beta", "noisy, beta"): {"sort_digits": True, "arithmetic": True}}
    for (a, b), by_task in predictions.items():
        for t in TASKS:
            mean, se = paired(finals, a, b, t)
            cost, _ = paired(finals, "clean", "noisy", t)
            said = verdict(mean, se, cost, by_task[t])
            lines.append(f"  {a + ' - ' + b:<30} {t:<12} {mean:+.3f} ± {se:.3f}   {said}")
    if plot_path is not None:
        plot(curves, plot_path)
        lines.append(f"learning curves: {plot_path}")
    return "\n".join(lines)


def plot(curves: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(11, 4), sharey=False)
    for ax, task in zip(axes, TASKS, strict=True):
        for name, runs in curves.items():
            steps = [s for s, _ in runs[0]]
            values = torch.tensor([[acc[task] for _, acc in run] for run in runs])
            mean = values.mean(0)
            se = values.std(0) / math.sqrt(len(runs)) if len(runs) > 1 else torch.zeros_like(mean)
            ax.plot(steps, mean, label=name)
            ax.fill_between(steps, mean - se, mean + se, alpha=0.2)
        ax.set_title(f"{task}: held-out accuracy (greedy)")
        ax.set_xlabel("GRPO step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
