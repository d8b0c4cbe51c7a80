"""``GRPOConfig``: the knobs of noise-corrected GRPO, validated in the style of ``elastic.core.config``.

Names and defaults follow TRL's ``GRPOConfig`` where TRL has the knob (num_generations, temperature,
top_p, epsilon, epsilon_high, beta, loss_type, scale_rewards, num_iterations); ``max_new_tokens`` is
TRL's ``max_completion_length``. The noise knobs are ours. Errors name the field, the rule and the fix.

The section registers itself as ``[grpo]`` when this module is imported (``register_section``), so
the base config never imports the GRPO recipe; a run's section is ``GRPOConfig.of(cfg)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from elastic.core.config import Config, knob, register_section
from elastic.recipes.grpo.advantage import CORRECTIONS, SCALE_REWARDS
from elastic.recipes.grpo.loss import LOSS_TYPES, PolicyKnobs
from elastic.recipes.grpo.noise import FlipRates
from elastic.recipes.grpo.rates import RateTable
from elastic.recipes.grpo.rewards import TASKS


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class GRPOConfig:
    """Group sampling, the clipped policy loss, and the noisy-reward model with its correction."""

    task: str = knob("arithmetic", f"built-in prompt set with an exact-answer reward: {', '.join(sorted(TASKS))}, "
                                   "or 'mixed' (both, interleaved; its rows' 'task' column names each)")
    reward_fn: str = knob("", "optional user reward 'package.module:function' taking (prompt, completion) -> float; "
                              "empty: the task's exact-answer reward")
    prompts: str = knob("", "a JSON/JSONL/Parquet file of prompts in TRL's prompt-only format ('prompt' as text "
                            "or messages, plus extra columns); empty: the built-in task's prompts")
    eval_prompts: str = knob("", "held-out prompts for train.eval_every (eval_reward: one greedy completion each), a "
                                 "file like grpo.prompts; empty: the built-in task's held-out problems")
    reward_funcs: str = knob("", "TRL-style reward functions 'pkg.mod:fn[,pkg.mod:fn2]', each called as "
                                 "fn(prompts, completions, **columns) -> list of floats; they add up; empty: "
                                 "exact-match accuracy on the 'answer' column")
    reward_weights: str = knob("", "TRL's reward_weights: one comma-separated weight per reward function "
                                   "(empty: all 1.0)")
    num_generations: int = knob(8, "completions sampled per prompt (G); advantages compare within these groups")
    temperature: float = knob(1.0, "sampling temperature of the completions")
    top_p: float = knob(1.0, "nucleus sampling: keep the smallest token set with this much probability")
    max_new_tokens: int = knob(8, "cap on completion tokens (TRL: max_completion_length; dr_grpo's normaliser)")
    epsilon: float = knob(0.2, "lower clip of the importance ratio: clamp(ratio, 1 - epsilon, ...)")
    epsilon_high: float | None = knob(None, "upper clip: clamp(ratio, ..., 1 + epsilon_high); None means epsilon "
                                            "(DAPO's clip-higher uses 0.28)")
    beta: float = knob(0.0, "weight of the k3 KL penalty to the reference model; 0 needs no reference model")
    loss_type: str = knob("dapo", f"loss aggregation, one of {', '.join(LOSS_TYPES)} (see recipes/grpo/loss.py)")
    scale_rewards: str = knob("group", f"advantage std scaling, one of {', '.join(SCALE_REWARDS)}; TRL's "
                                       "True/False mean group/none")
    importance_sampling_level: str = knob("token", "importance ratio per token, or per sequence (GSPO)")
    delta: float | None = knob(None, "two-sided clipping: cap the ratio at delta inside the PPO min (None: off)")
    mask_truncated_completions: bool = knob(False, "no loss on completions that hit max_new_tokens without EOS; "
                                                   "TRL counts num_items_in_batch after this masking")
    top_entropy_quantile: float = knob(1.0, "policy loss only on this top fraction of tokens by entropy, the "
                                            "quantile taken over the whole global batch (1.0: all tokens)")
    sapo_temperature_pos: float = knob(1.0, "SAPO's gate temperature for positive advantages")
    sapo_temperature_neg: float = knob(1.05, "SAPO's gate temperature for non-positive advantages")
    num_iterations: int = knob(1, "gradient steps per generated batch (mu); > 1 reuses stored old log-probs, and "
                                  "snapshots and checkpoints then fall on multiples of it")
    correction: str = knob("none", f"reward-noise correction of the advantages, one of {', '.join(CORRECTIONS)}")
    rho_plus: float = knob(0.0, "false-positive rate P(observed 1 | true 0) of the reward")
    rho_minus: float = knob(0.0, "false-negative rate P(observed 0 | true 1) of the reward")
    inject_noise: bool = knob(True, "flip the verifiable reward with rho_plus/rho_minus (a simulated noisy verifier); "
                                    "False when the reward function is itself noisy and the rates only describe it")
    estimate_rates: bool = knob(False, "estimate the rates the correction uses from a calibration set with gold "
                                       "labels, per rate group, instead of assuming rho_plus/rho_minus are known")
    calibration_size: int = knob(512, "samples in the synthetic calibration set drawn from held-out prompts "
                                      "(estimate_rates without grpo.calibration)")
    calibration: str = knob("", "a gold-labelled calibration file (JSON/JSONL/Parquet: prompt, completion, label "
                                "0/1, plus the rate-group column); the verifier scores each completion and the "
                                "rates are its disagreements with the labels (estimate_rates)")
    min_calibration: int = knob(20, "fewest calibration samples of each gold label a rate group needs")
    rate_group: str = knob("", "what puts prompts in rate groups: a dataset column (e.g. 'task') or "
                               "'pkg.mod:fn' taking a row and returning a group name; empty: one group")
    group_rates: str = knob("", "flip rates per rate group 'group=rho_plus:rho_minus,...' (of the injected noise, "
                                "and assumed by the correction unless estimated); other groups take rho_plus/rho_minus")

    def __post_init__(self) -> None:
        # TRL's aliases: scale_rewards=True is "group", False is "none" (also as the strings of a flag or TOML).
        alias = {True: "group", False: "none", "true": "group", "false": "none"}
        key = self.scale_rewards.lower() if isinstance(self.scale_rewards, str) else self.scale_rewards
        if isinstance(key, bool) or key in ("true", "false"):
            object.__setattr__(self, "scale_rewards", alias[key])
        self._check_rewards_sampling_and_loss()
        self._check_noise_and_correction()

    def _check_rewards_sampling_and_loss(self) -> None:
        """Reward functions, sampling and TRL's loss knobs (one clear error each)."""
        _require(self.task in (*TASKS, "mixed"), f"grpo.task={self.task!r} is not one of {sorted(TASKS)} or 'mixed'")
        _require(self.reward_fn == "" or (self.reward_fn.count(":") == 1 and all(self.reward_fn.split(":"))),
                 f"grpo.reward_fn={self.reward_fn!r} must be empty or an import path 'package.module:function'")
        _require(not self.reward_weights or bool(self.reward_funcs),
                 f"grpo.reward_weights={self.reward_weights!r} weighs grpo.reward_funcs, which is empty; name the "
                 "functions too")
        _require(not (self.reward_funcs and self.reward_fn),
                 "set grpo.reward_funcs (TRL's batch convention) or grpo.reward_fn (one prompt, one completion), "
                 "not both")
        _require(isinstance(self.num_generations, int) and self.num_generations >= 2,
                 f"grpo.num_generations={self.num_generations!r} must be an integer >= 2: group advantages compare "
                 "each completion with the others of its prompt")
        _require(_is_number(self.temperature) and self.temperature > 0,
                 f"grpo.temperature={self.temperature!r} must be > 0 (policy-gradient RL needs sampled completions)")
        _require(_is_number(self.top_p) and 0 < self.top_p <= 1, f"grpo.top_p={self.top_p!r} must lie in (0, 1]")
        _require(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
                 f"grpo.max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        _require(_is_number(self.epsilon) and 0 < self.epsilon < 1,
                 f"grpo.epsilon={self.epsilon!r} must lie in (0, 1) so that the lower clip 1 - epsilon stays positive")
        _require(self.epsilon_high is None or (_is_number(self.epsilon_high) and self.epsilon_high > 0),
                 f"grpo.epsilon_high={self.epsilon_high!r} must be > 0, or None to use epsilon")
        _require(_is_number(self.beta) and self.beta >= 0, f"grpo.beta={self.beta!r} must be >= 0")
        _require(self.loss_type in LOSS_TYPES, f"grpo.loss_type={self.loss_type!r} is not one of {LOSS_TYPES}")
        _require(self.scale_rewards in SCALE_REWARDS,
                 f"grpo.scale_rewards={self.scale_rewards!r} is not one of {SCALE_REWARDS}")
        try:
            _ = self.knobs  # PolicyKnobs validates the level and delta
        except ValueError as err:
            raise ValueError(f"grpo.{err}") from None
        _require(_is_number(self.top_entropy_quantile) and 0 < self.top_entropy_quantile <= 1,
                 f"grpo.top_entropy_quantile={self.top_entropy_quantile!r} must lie in (0, 1] (1.0: every token)")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            value = getattr(self, name)
            _require(_is_number(value) and value > 0, f"grpo.{name}={value!r} must be > 0")
        _require(isinstance(self.num_iterations, int) and self.num_iterations >= 1,
                 f"grpo.num_iterations={self.num_iterations!r} must be an integer >= 1")

    def _check_noise_and_correction(self) -> None:
        """The noise model, the correction and what it needs (rates given or estimated, calibration)."""
        _require(self.correction in CORRECTIONS, f"grpo.correction={self.correction!r} is not one of {CORRECTIONS}")
        _require(self.correction not in ("dr_grpo", "posterior") or self.scale_rewards == "none",
                 f"grpo.correction={self.correction!r} divides by no std but grpo.scale_rewards="
                 f"{self.scale_rewards!r}; set scale_rewards='none', or use correction='grpo'")
        _require(self.correction != "grpo" or self.scale_rewards != "none",
                 "grpo.correction='grpo' estimates a clean std per group or per batch; set scale_rewards to "
                 "'group' or 'batch', or use correction='dr_grpo' for no std scaling")
        for name in ("rho_plus", "rho_minus"):
            value = getattr(self, name)
            _require(_is_number(value) and 0 <= value < 1, f"grpo.{name}={value!r} must lie in [0, 1)")
        _require(self.rho_plus + self.rho_minus < 1,
                 f"grpo.rho_plus + grpo.rho_minus = {self.rho_plus + self.rho_minus:g} must be < 1: at 1 the observed "
                 "reward says nothing about the true one; lower the rates")
        given = self.rho_plus > 0 or self.rho_minus > 0 or bool(self.group_rates)
        _require(self.inject_noise or self.reward_fn or self.reward_funcs or not given,
                 f"grpo.rho_plus={self.rho_plus}, grpo.rho_minus={self.rho_minus} describe reward noise, but "
                 f"inject_noise=False and the {self.task!r} reward is exact; set inject_noise=True to simulate "
                 "the noise, or set the rates to 0")
        _require(self.correction == "none" or given or self.estimate_rates,
                 f"grpo.correction={self.correction!r} needs flip rates, and the config gives none (rho_plus = "
                 "rho_minus = 0, no group_rates); set them, or estimate them with estimate_rates=True")
        _require(self.correction != "forward" or self.rho_minus > 0 or bool(self.group_rates) or self.estimate_rates,
                 "grpo.correction='forward' needs the false-negative rate rho_minus, and the config gives "
                 f"rho_minus={self.rho_minus}; set it (or group_rates), or estimate it with estimate_rates=True")
        _require(self.correction != "forward" or not self._any_rho_plus(),
                 "grpo.correction='forward' assumes rho_plus = 0 (an observed 1 is a true 1), but the config gives "
                 f"rho_plus={self.rho_plus} or group_rates={self.group_rates!r} with a false-positive rate; use "
                 "correction='posterior', which accounts for both rates")
        _require(not self.calibration or self.estimate_rates,
                 f"grpo.calibration={self.calibration!r} is only read to estimate rates; set estimate_rates=True")
        _require(isinstance(self.min_calibration, int) and self.min_calibration >= 1,
                 f"grpo.min_calibration={self.min_calibration!r} must be an integer >= 1")
        try:
            _ = self.rate_table
        except ValueError as err:
            raise ValueError(str(err)) from None
        _require(isinstance(self.calibration_size, int) and self.calibration_size >= 2,
                 f"grpo.calibration_size={self.calibration_size!r} must be an integer >= 2 (both labels must appear)")

    def _any_rho_plus(self) -> bool:
        """A configured false-positive rate (group rates that do not parse are reported by rate_table)."""
        try:
            return self.rho_plus > 0 or any(r.rho_plus > 0 for r in self.rate_table.groups.values())
        except ValueError:
            return self.rho_plus > 0

    @property
    def knobs(self) -> PolicyKnobs:
        """The policy term's options, as ``recipes/grpo/loss.py`` takes them."""
        return PolicyKnobs(self.epsilon, self.epsilon_high, self.beta, self.importance_sampling_level, self.delta,
                           self.sapo_temperature_pos, self.sapo_temperature_neg)

    @property
    def flip_rates(self) -> FlipRates:
        """The configured rates (of the injected noise, and assumed by the correction unless estimated)."""
        return FlipRates(self.rho_plus, self.rho_minus)

    @property
    def rate_table(self) -> RateTable:
        """The configured rates per rate group; groups not named take rho_plus/rho_minus."""
        return RateTable.parse(self.group_rates, self.flip_rates)

    @staticmethod
    def of(cfg: Config) -> GRPOConfig:
        """The run's [grpo] section; a clear error when the run has none."""
        section = cfg.section("grpo")
        _require(section is not None, "a GRPO run needs a [grpo] config section (elastic.recipes.grpo.config."
                                      "GRPOConfig); build the config with elastic.recipes.grpo.recipe.grpo_config")
        return section


register_section("grpo", GRPOConfig)
