"""The GRPO loop's bookkeeping, independent of where the model runs.

GRPO step ``k`` uses prompts ``sampler.step_indices(k)`` (each prompt once per epoch, by global
index), ``num_generations`` completions each. The rollouts are scored by the run's reward functions
(``prompts.py``; by default exact-match ``accuracy``: the *true* reward r*), passed through the
seeded flip channel when noise is injected (observed r~), turned into advantages (with the
configured noise correction, using the true rates or rates estimated once from a calibration set
with gold labels), and packed into one global batch. Each data-parallel rank then takes a
contiguous share of its rows; the loss normaliser comes from the whole batch. ``num_iterations``
optimizer steps reuse the batch of step ``k``.

Pure torch: no processes, no distributed code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from elastic.core.config import Config
from elastic.core.data import GlobalSampler
from elastic.core.layout import balanced
from elastic.core.seeds import stable_seed
from elastic.core.tokenizer import load_tokenizer
from elastic.recipes.grpo.advantage import noise_corrected_advantages
from elastic.recipes.grpo.config import GRPOConfig
from elastic.recipes.grpo.loss import GlobalBatch
from elastic.recipes.grpo.noise import FlipRates, RewardNoise, estimate_flip_rates
from elastic.recipes.grpo.prompts import PromptTask, parse_weights, reward_functions, score_batch


@dataclass
class StepBatch:
    """Everything the optimizer steps of one GRPO step need, for all ranks."""

    rows: dict[str, torch.Tensor]  # input_ids [N, P + C], mask [N, C], advantages [N], old/ref [N, C]
    prompts: list[int]  # the global prompt index of each of the P prompts
    batch: GlobalBatch
    stats: dict = field(default_factory=dict)


class GRPOLoop:
    def __init__(self, cfg: Config) -> None:
        self.cfg, self.grpo = cfg, GRPOConfig.of(cfg)
        self.tok = load_tokenizer(cfg.data.tokenizer)
        g = self.grpo
        if g.prompts:
            self.task = PromptTask.from_file(g.prompts, self.tok, g.max_new_tokens, cfg.model.max_seq_len)
        else:  # a built-in task is an ordinary prompt set, scored by the same reward functions
            self.task = PromptTask.builtin(g.task, cfg.data.seq_len, cfg.data.num_samples, cfg.train.seed, self.tok,
                                           g.max_new_tokens, cfg.model.max_seq_len)
        self.reward_funcs = reward_functions(g.reward_funcs, g.reward_fn)
        self.reward_weights = parse_weights(g.reward_weights, len(self.reward_funcs))
        if not (g.reward_funcs or g.reward_fn) and "answer" not in self.task.columns:
            raise ValueError(f"{self.task.where}: the default reward (exact-match accuracy) compares with an 'answer' "
                             f"column, and its columns are {['prompt', *self.task.columns]}; add one, or name your "
                             "reward with grpo.reward_funcs='package.module:function'")
        self.noise = RewardNoise(self.grpo.flip_rates, cfg.train.seed) if self.grpo.inject_noise else None
        self.sampler = GlobalSampler(len(self.task), cfg.train.global_batch, cfg.train.seed)
        self.rates = self.estimated_rates() if self.grpo.estimate_rates else self.grpo.flip_rates
        if self.grpo.beta > 0 and cfg.lora is None:
            raise ValueError("grpo.beta > 0 needs a reference model; use LoRA (its frozen base is the reference) "
                             "or set grpo.beta = 0")

    def prompts(self, k: int) -> list[tuple[int, list[int], list[bool] | None]]:
        """(global index, token ids, mask of the real tokens or None when all are) of step ``k``'s prompts."""
        return [(i, self.task.prompt_ids(i), self.task.prompt_mask(i)) for i in self.sampler.step_indices(k)]

    def share(self, items: list, data_index: int, data_parallel: int) -> list:
        lo, hi = balanced(len(items), data_parallel, data_index)
        return items[lo:hi]

    def estimated_rates(self) -> FlipRates:
        """Flip rates measured on a calibration set with gold labels: held-out problems with their true
        answer or a wrong one (half each), scored, passed through the same noisy channel."""
        size = self.grpo.calibration_size
        if not self.task.holdout_size():
            raise ValueError(f"grpo.estimate_rates needs held-out prompts to calibrate on, and {self.task.where} has "
                             "none; use a built-in task, or give the rates with grpo.rho_plus/rho_minus")
        indices = [i % self.task.holdout_size() for i in range(size)]
        answers = []
        for n, i in enumerate(indices):
            answer = self.task.problem(i, "holdout").answer
            right = random.Random(stable_seed(self.cfg.train.seed, "calibration", n)).random() < 0.5
            answers.append(answer if right else str(int(answer) + 1))
        columns = {c: [self.task.column(c, i, "holdout") for i in indices] for c in self.task.columns}
        gold_t = score_batch(self.reward_funcs, [self.task.prompt(i, "holdout") for i in indices], answers, columns,
                             [self.tok.encode(a) for a in answers], self.reward_weights)
        if self.noise is None:
            raise ValueError("grpo.estimate_rates needs observed rewards from the noisy channel (inject_noise)")
        observed_t = self.noise.observe(gold_t, list(range(size)), [0] * size, split="calibration")
        return estimate_flip_rates(observed_t, gold_t)

    def build(self, k: int, parts: list[dict]) -> StepBatch:
        """Score and pack the rollouts of step ``k``; ``parts`` are the data-parallel ranks' rollouts in order."""
        G = self.grpo.num_generations
        prompts = [p for part in parts for p in part["prompts"]]
        if prompts != [i for i, _, _ in self.prompts(k)]:
            raise RuntimeError(f"rollouts of step {k} cover prompts {prompts[:4]}..., expected the step's batch")
        tokens = torch.cat([part["tokens"] for part in parts])
        lengths = torch.cat([part["lengths"] for part in parts])
        owners = [i for i in prompts for _ in range(G)]  # each completion's prompt index
        prompt_ids = torch.tensor([self.task.prompt_ids(i) for i in owners])
        completions = [self.tok.decode(tokens[r, : int(lengths[r])]) for r in range(len(owners))]
        columns = {c: [self.task.column(c, i) for i in owners] for c in self.task.columns}
        clean = score_batch(self.reward_funcs, [self.task.prompt(i) for i in owners], completions, columns,
                            [tokens[r, : int(lengths[r])].tolist() for r in range(len(owners))], self.reward_weights)
        observed = clean if self.noise is None else self.noise.observe_groups(clean, prompts, G, step=k)
        advantages = noise_corrected_advantages(observed, G, self.rates, self.grpo.correction,
                                                self.grpo.scale_rewards)
        width = tokens.shape[1]
        mask = torch.arange(width)[None, :] < lengths[:, None]
        if self.grpo.mask_truncated_completions:  # TRL: no loss on a completion cut off before its EOS
            truncated = tokens[torch.arange(len(tokens)), lengths - 1] != self.tok.eos_id
            mask &= ~truncated[:, None]
        rows = {"input_ids": torch.cat([prompt_ids, tokens], dim=1), "mask": mask, "advantages": advantages}
        rows["prompt_mask"] = torch.tensor([self.task.prompt_mask(i) for i in owners])
        for key in ("old", "ref"):
            if key in parts[0]:
                rows[key] = torch.cat([part[key] for part in parts])
        # Each row's global completion index (prompt index * G + sample index): the rank that trains on a row
        # reports it, and the run's ledger is built from those reports.
        rows["completion"] = torch.tensor([i * G + g for i in prompts for g in range(G)])
        batch = GlobalBatch.of(mask, self.grpo.max_new_tokens)
        stats = {"reward_true": float(clean.mean()), "reward_observed": float(observed.mean()),
                 "completion_tokens": int(mask.sum())}
        return StepBatch(rows, prompts, batch, stats)

    def shard(self, step_batch: StepBatch, data_index: int, data_parallel: int) -> dict:
        """This data-parallel rank's rows (contiguous, balanced), with their global completion indices."""
        n = step_batch.rows["input_ids"].shape[0]
        lo, hi = balanced(n, data_parallel, data_index)
        return {k: v[lo:hi] for k, v in step_batch.rows.items()}
