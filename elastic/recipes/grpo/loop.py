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

import logging
import warnings
from dataclasses import dataclass, field

import torch

from elastic.core.boxes import balanced
from elastic.core.config import Config
from elastic.core.data import GlobalSampler
from elastic.core.tokenizer import load_tokenizer
from elastic.recipes.grpo.advantage import noise_corrected_advantages
from elastic.recipes.grpo.calibration import calibrate, file_set, group_function, synthetic_set
from elastic.recipes.grpo.config import GRPOConfig
from elastic.recipes.grpo.loss import GlobalBatch
from elastic.recipes.grpo.noise import RewardNoise
from elastic.recipes.grpo.prompts import PromptTask, parse_weights, reward_functions, score_batch
from elastic.recipes.grpo.rates import RateTable
from elastic.recipes.grpo.report import display_names, rollout_metrics

log = logging.getLogger("elastic")


class NoOpCorrectionWarning(UserWarning):
    """The configured noise correction cannot change training (``docs/grpo_noise.md``)."""


def warn_if_no_op(g: GRPOConfig, rates: RateTable, grad_clip: float) -> None:
    """Warn once, at start-up, when the correction only rescales every gradient by one constant 1/J: AdamW
    (the engine's optimizer) divides that out, so only its eps and gradient clipping see it."""
    if g.correction != "dr_grpo" or not rates.constant or g.beta > 0:
        return
    if not rates.groups and rates.default is None:
        return
    scale = next(iter(rates.groups.values()), rates.default).scale
    clip = (f"gradient clipping at {grad_clip} sees the scale, so it can change only the clipped steps"
            if grad_clip > 0 else "gradient clipping is off")
    warnings.warn(f"grpo.correction='dr_grpo' with one set of flip rates (J = {scale:.3f}), beta = 0 and AdamW "
                  f"multiplies every gradient by 1/J = {1 / scale:.3f}, which AdamW's normalisation removes: training "
                  f"changes only through AdamW's eps ({clip}). The correction matters with rates that differ "
                  "between rate groups (grpo.rate_group, grpo.group_rates), with beta > 0, or under SGD; see "
                  "docs/grpo_noise.md", NoOpCorrectionWarning, stacklevel=2)


@dataclass
class StepBatch:
    """Everything the optimizer steps of one GRPO step need, for all ranks."""

    rows: dict[str, torch.Tensor]  # input_ids [N, P + C], mask [N, C], advantages [N], old/ref [N, C]
    prompts: list[int]  # the global prompt index of each of the P prompts
    batch: GlobalBatch
    stats: dict = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # TRL's rollout metrics of this step (``report.py``)


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
        self.group_of = group_function(g.rate_group, ["prompt", *self.task.columns], self.task.where)
        # The configured rates: of the injected channel, and the correction's unless estimated.
        self.true_rates = g.rate_table
        self.noise = RewardNoise(g.flip_rates, cfg.train.seed) if g.inject_noise else None
        self.sampler = GlobalSampler(len(self.task), cfg.train.global_batch, cfg.train.seed)
        self.estimates = []
        self.rates = self.estimated_rates() if g.estimate_rates else self.true_rates
        if self.grpo.beta > 0 and cfg.lora is None:
            raise ValueError("grpo.beta > 0 needs a reference model; use LoRA (its frozen base is the reference) "
                             "or set grpo.beta = 0")
        if g.correction == "dr_grpo" and g.beta == 0:  # only then can the warning fire; reading groups costs
            warn_if_no_op(g, self.rates.used_by(self.groups_met()), cfg.optim.grad_clip)

    def groups_met(self) -> set[str]:
        """The rate groups of the prompts the run's steps take (every prompt once the steps cover an epoch)."""
        steps = min(self.cfg.train.steps, -(-len(self.task) // self.cfg.train.global_batch))
        return {self.group_of(self.task.row(i)) for k in range(steps) for i in self.sampler.step_indices(k)}

    def prompts(self, k: int) -> list[tuple[int, list[int], list[bool] | None]]:
        """(global index, token ids, mask of the real tokens or None when all are) of step ``k``'s prompts."""
        return [(i, self.task.prompt_ids(i), self.task.prompt_mask(i)) for i in self.sampler.step_indices(k)]

    def share(self, items: list, data_index: int, data_parallel: int) -> list:
        lo, hi = balanced(len(items), data_parallel, data_index)
        return items[lo:hi]

    def estimated_rates(self) -> RateTable:
        """Per-group flip rates from the gold-labelled calibration set (``calibration.py``), logged with
        their 95% intervals."""
        g = self.grpo
        rows = file_set(g.calibration) if g.calibration else synthetic_set(self.task, g.calibration_size,
                                                                             self.cfg.train.seed)
        table, self.estimates = calibrate(rows, self.group_of, self.reward_funcs, self.reward_weights, self.noise,
                                          self.true_rates, self.tok, g.min_calibration)
        source = g.calibration or f"{len(rows)} synthetic candidates for held-out prompts"
        log.info("flip rates estimated from %s (95%% Wilson intervals):\n%s", source,
                 "\n".join(e.line() for e in self.estimates))
        return table

    def build(self, k: int, parts: list[dict]) -> StepBatch:
        """Score and pack the rollouts of step ``k``; ``parts`` are the data-parallel ranks' rollouts in order."""
        G = self.grpo.num_generations
        prompts = [p for part in parts for p in part["prompts"]]
        if prompts != self.sampler.step_indices(k):
            raise RuntimeError(f"rollouts of step {k} cover prompts {prompts[:4]}..., expected the step's batch")
        tokens = torch.cat([part["tokens"] for part in parts])
        lengths = torch.cat([part["lengths"] for part in parts])
        rows_of = [self.task.row(i) for i in prompts]  # once per prompt: a built-in row is generated per call
        groups = [self.group_of(row) for row in rows_of]
        owners = [row for row in rows_of for _ in range(G)]  # each completion's prompt row
        completions = [self.tok.decode(tokens[r, : int(lengths[r])]) for r in range(len(owners))]
        columns = {c: [row[c] for row in owners] for c in self.task.columns}
        per_func = []
        clean = score_batch(self.reward_funcs, [row["prompt"] for row in owners], completions, columns,
                            [tokens[r, : int(lengths[r])].tolist() for r in range(len(owners))], self.reward_weights,
                            per_func)
        observed = clean if self.noise is None else self.noise.observe_groups(
            clean, prompts, G, step=k, rates=self.true_rates.rows(groups))
        advantages = noise_corrected_advantages(observed, G, self.rates.rows(groups), self.grpo.correction,
                                                self.grpo.scale_rewards)
        width = tokens.shape[1]
        mask = torch.arange(width)[None, :] < lengths[:, None]
        truncated = tokens[torch.arange(len(tokens)), lengths - 1] != self.tok.eos_id  # no EOS within the cap
        if self.grpo.mask_truncated_completions:  # TRL: no loss on a completion cut off before its EOS
            mask &= ~truncated[:, None]
        prompt_ids = torch.tensor([self.task.prompt_ids(i) for i in prompts]).repeat_interleave(G, dim=0)
        rows = {"input_ids": torch.cat([prompt_ids, tokens], dim=1), "mask": mask, "advantages": advantages}
        rows["prompt_mask"] = torch.tensor([self.task.prompt_mask(i) for i in prompts]).repeat_interleave(G, dim=0)
        for key in ("old", "ref"):
            if key in parts[0]:
                rows[key] = torch.cat([part[key] for part in parts])
        # Each row's global completion index (prompt index * G + sample index): the rank that trains on a row
        # reports it, and the run's ledger is built from those reports.
        rows["completion"] = torch.tensor([i * G + g for i in prompts for g in range(G)])
        batch = GlobalBatch.of(mask, self.grpo.max_new_tokens)
        stats = {"reward_true": float(clean.nanmean()), "reward_observed": float(observed.nanmean()),
                 "completion_tokens": int(mask.sum())}
        names = display_names([name for name, _ in self.reward_funcs])
        metrics = rollout_metrics(torch.tensor(per_func, dtype=torch.float64).T, names, observed, lengths, truncated)
        return StepBatch(rows, prompts, batch, stats, metrics)

    def shard(self, step_batch: StepBatch, data_index: int, data_parallel: int) -> dict:
        """This data-parallel rank's rows (contiguous, balanced), with their global completion indices."""
        n = step_batch.rows["input_ids"].shape[0]
        lo, hi = balanced(n, data_parallel, data_index)
        return {k: v[lo:hi] for k, v in step_batch.rows.items()}
