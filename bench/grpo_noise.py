"""Does noise-corrected GRPO help, and exactly when? Three experiments, one report (docs/grpo_noise.md).

    .venv/bin/python bench/grpo_noise.py --quick   # the gradient and bandit experiments in full, the LM one
                                                   # with a single seed: about 10 to 15 minutes on 2 cores
    .venv/bin/python bench/grpo_noise.py           # 5 paired seeds for the LM one: about an hour

1. Gradient level (``noise_gradient.py``): cos(g~, g*) of each arm's gradient on one frozen
   policy's completions, over 64 noise seeds, with rates that differ by task; and a real verifier.
2. Optimiser level (``noise_bandit.py``): a tabular softmax bandit, AdamW and SGD, constant and
   per-group rates, with a matched-learning-rate control.
3. The language model (``noise_lm.py``): GRPO on two built-in task types whose verifier noise
   differs, rates estimated; held-out accuracy per type, paired differences, learning curves (PNG).

Each section prints its verdicts, computed from paired 95% intervals against what the theory
predicts: equality where a correction cannot change training, a gain where it can. Never fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import noise_bandit  # noqa: E402  (the bench folder is not a package)
import noise_gradient  # noqa: E402
import noise_lm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one LM seed (the other two experiments in full)")
    parser.add_argument("--only", choices=("gradient", "bandit", "lm"), help="run one experiment")
    args = parser.parse_args()
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    # (run, whether it prints its own tables as it goes: the bandit does, setting by setting)
    sections = {"gradient": (lambda: noise_gradient.run(args.quick), False),
                "bandit": (lambda: noise_bandit.run(args.quick), True),
                "lm": (lambda: noise_lm.run(args.quick, plot_path=out / "grpo_noise_lm.png"), False)}
    for name, (run, printed) in sections.items():
        if args.only and name != args.only:
            continue
        started = time.perf_counter()
        report = run()
        print(f"\n=== {name} ({time.perf_counter() - started:.0f} s)" + ("" if printed else f"\n{report}"), flush=True)


if __name__ == "__main__":
    main()
