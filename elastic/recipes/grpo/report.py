"""What TRL's ``GRPOTrainer`` logs of a GRPO step's rollouts, under its names, from the whole batch.

TRL logs, per generation batch (``_generate_and_score_completions``), over every process's completions:

- ``reward`` / ``reward_std``: nanmean and nanstd of the rewards its advantages come from (the functions'
  values times ``reward_weights``, nansummed; NaN where every function returned None). Here, with
  injected noise, that is the observed (flipped) reward, since it is what the advantages see;
- ``rewards/<func>/mean`` / ``/std``: nanmean and nanstd of one function's own values (None skipped),
  ``<func>`` being the function's ``__name__`` (TRL's ``get_callable_name``);
- ``completions/mean_length``, ``min_length``, ``max_length``: completion tokens up to and including the
  first EOS; ``completions/clipped_ratio``: the share that ended without an EOS (cut at the cap).

TRL's ``nanstd`` has Bessel's correction and is NaN for fewer than two values. The driver holds the whole
rollout batch, so these are exact whatever the layout. Pure torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def nanstd(x: torch.Tensor) -> float:
    """TRL's ``nanstd``: the standard deviation of the non-NaN values, with Bessel's correction (NaN below 2)."""
    values = x[~torch.isnan(x)].double()
    return float(values.std(correction=1)) if values.numel() > 1 else float("nan")


def display_names(specs: Sequence[str]) -> list[str]:
    """TRL's name of each reward function, from our ``package.module:function`` specs: the function's name,
    unless two functions share it (then the whole spec, so that their metrics do not overwrite each other)."""
    short = [spec.rpartition(":")[2] for spec in specs]
    return [s if short.count(s) == 1 else spec for s, spec in zip(short, specs, strict=True)]


def rollout_metrics(per_func: torch.Tensor, names: Sequence[str], rewards: torch.Tensor, lengths: torch.Tensor,
                    truncated: torch.Tensor) -> dict[str, float]:
    """TRL's rollout metrics: ``per_func`` [N, F] each function's values (NaN for None), ``rewards`` [N] the
    rewards the advantages use, ``lengths`` [N] completion tokens, ``truncated`` [N] no EOS within the cap."""
    out = {"reward": float(torch.nanmean(rewards.double())), "reward_std": nanstd(rewards)}
    for f, name in enumerate(names):
        out[f"rewards/{name}/mean"] = float(torch.nanmean(per_func[:, f].double()))
        out[f"rewards/{name}/std"] = nanstd(per_func[:, f])
    lengths = lengths.double()
    out.update({"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                "completions/max_length": float(lengths.max()),
                "completions/clipped_ratio": float(truncated.double().mean())})
    return out
