"""GRPO with noise-corrected rewards: the pure-math half (plain tensors, no processes).

RL from verifiable rewards that are sometimes wrong (arXiv:2510.18924, "Noise-corrected GRPO").
The observed reward r~ is the true 0/1 reward r* sent through a flip channel with
rho_plus = P(r~=1 | r*=0) and rho_minus = P(r~=0 | r*=1); the corrections below undo its bias.

- ``rewards``:   verifiable 0/1 rewards (arithmetic, sort-digits task, user callables) with checks;
- ``noise``:     the seeded, layout-independent flip channel, flip-rate estimation, corrected reward;
- ``advantage``: group advantages in TRL's GRPOTrainer conventions, plus the noise corrections;
- ``loss``:      TRL's clipped surrogate + k3 KL, written as a sum of per-sequence terms over a
                 normaliser taken from the global batch, so data-parallel shards add up exactly;
- ``config``:    ``GRPOConfig``, validated like the rest of ``elastic.core.config``.

Like every recipe, this package imports neither ray nor torch.distributed (DESIGN.md, invariant 5):
the engine gathers the global quantities (rewards of a whole group, token counts) and passes them in.
"""
