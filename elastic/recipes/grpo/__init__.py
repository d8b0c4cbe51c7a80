"""GRPO with noise-corrected rewards.

RL from verifiable rewards that are sometimes wrong (arXiv:2510.18924, "Noise-corrected GRPO").
The observed reward r~ is the true 0/1 reward r* sent through a flip channel with
rho_plus = P(r~=1 | r*=0) and rho_minus = P(r~=0 | r*=1); the corrections below undo its bias.

- ``rewards``:   verifiable 0/1 rewards (arithmetic, sort-digits task, lenient and strict verifiers,
                 user callables) with checks;
- ``prompts``:   prompt sets (a user's file, or a built-in task as rows) and TRL-style reward functions;
- ``noise``:     the seeded, layout-independent flip channel and the corrected reward;
- ``rates``:     flip rates per rate group, and their estimation with confidence intervals;
- ``calibration``: rate groups and the gold-labelled calibration set the rates are estimated from;
- ``advantage``: group advantages in TRL's GRPOTrainer conventions, plus the noise corrections;
- ``loss``:      TRL's clipped surrogate + k3 KL, written as a sum of per-sequence terms over a
                 normaliser taken from the global batch, so data-parallel shards add up exactly;
- ``config``:    ``GRPOConfig``, the ``[grpo]`` config section (registered on import);
- ``loop``:      the bookkeeping of a GRPO step (prompts, scoring, advantages, shards), pure;
- ``worker``:    the worker-side tasks (``Rollout``, ``GRPOStep``);
- ``workload``:  the driver-side workload (rollout and train phases under the controller);
- ``recipe``:    ``grpo_config``, the recipe's config.

The math modules import neither ray nor torch.distributed (DESIGN.md, invariant 5; import-linter):
the engine gathers the global quantities (rewards of a whole group, token counts) and passes them in.
"""

from __future__ import annotations

from elastic.recipes.grpo.config import GRPOConfig
from elastic.recipes.recipe import Preset, Recipe, RecipeArgs


def _build(args: RecipeArgs):
    from elastic.recipes.grpo.recipe import grpo_config

    return grpo_config(base=args.base, steps=args.steps or 30, workers=args.workers, data=args.data,
                       lora=args.peft, real=args.base is not None)


def _preset(args: RecipeArgs) -> Preset:
    """A user's --base gets real-model defaults; without it the random 'mini' model is a toy preset."""
    if args.base is None:
        return Preset(toy="a random 1M-parameter model with toy defaults (lr 1e-3, 6 new tokens, 8 prompts per "
                          "step); --base FOLDER trains your model with TRL's defaults")
    from elastic.recipes.grpo.recipe import REAL_WHY

    return Preset(why=REAL_WHY)


def _workload(cfg):
    from elastic.recipes.grpo.workload import GRPOWorkload

    return GRPOWorkload(cfg)


def _finish(cfg, result, run_dir, workload) -> list[str]:
    """The policy, saved as the lora recipe saves its result (``model/export.py``), how to sample from it, and
    where the time went."""
    lines = [f"time in rollouts {workload.seconds['rollout']:.1f} s, in updates {workload.seconds['train']:.1f} s, "
             f"in reshards {sum(r.total_seconds for r in result.reshards):.1f} s ({len(result.reshards)} reshards)"]
    from elastic.model.export import how_to_sample

    written = result.model_folders(cfg, run_dir)
    return (how_to_sample(written, cfg.train.init_from) if written else []) + lines


RECIPE = Recipe("grpo", "GRPO: noise-corrected rewards on a built-in task, or --data prompts with --grpo.reward_funcs",
                _build, workload=_workload, finish=_finish, sections=(GRPOConfig,), preset=_preset)
