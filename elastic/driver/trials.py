"""Independent single-process trials spread over the cluster as Ray tasks (fractional CPUs each), as
many at once as the cluster holds, with a progress bar. A learning-rate sweep is the one user
(``recipes/lora/sweep.py``); the trial itself is ``runtime/trial.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import ray
from tqdm import tqdm

from elastic.core.config import Config


@ray.remote(max_retries=0)
def _trial(cfg: Config, evals: Mapping[str, Sequence[int]]) -> dict:
    from elastic.runtime.trial import train_and_evaluate

    return train_and_evaluate(cfg, evals)


def run_trials(cfgs: list[Config], evals: Mapping[str, Sequence[int]], progress: bool = True, desc: str = "trials",
               postfix: Callable[[dict], dict] | None = None) -> list[dict]:
    """One trial per config (Ray must be connected), each scored on every held-out index set of ``evals``
    (name -> indices); results in the order they finish."""
    refs = [_trial.options(num_cpus=cfg.runtime.cpus_per_worker).remote(cfg, evals) for cfg in cfgs]
    results, pending = [], list(refs)
    with tqdm(total=len(refs), desc=desc, unit="trial", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results.append(ray.get(done[0]))
            if postfix is not None:
                bar.set_postfix(**postfix(results[-1]))
            bar.update(1)
    return results
