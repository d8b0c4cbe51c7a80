"""Does noise-corrected GRPO help, and exactly when? The experiments of docs/grpo_noise.md, one report.

    .venv/bin/python bench/grpo_noise.py --quick      # the bandit, 2 settings, fewer seeds: under a minute
    .venv/bin/python bench/grpo_noise.py              # the bandit in full: 8 minutes on a lightly loaded
                                                      # 2-core machine (40 under a load average of 5-35)
    .venv/bin/python bench/grpo_noise.py --gradient   # adds the gradient study (an SFT warm-up, then gradients)
    .venv/bin/python bench/grpo_noise.py --lm         # adds the LM confirmation: about 40 minutes
                                                      # (with --quick: a tiny run that checks the machinery)

1. Optimiser level (``noise_bandit.py``): a shared-parameter softmax bandit with four rate groups, every arm
   at its own best lr, paired t-intervals with a Holm correction, and the decision rule's verdict.
2. Gradient level (``noise_gradient.py``, ``--gradient``): cos(g~, g*) of each arm's gradient on one frozen
   policy's completions against its family's clean gradient, over noise seeds, and a realistic verifier.
3. The language model (``noise_lm.py``, ``--lm``): GRPO on two task types whose verifier noise differs, every
   arm at its best of three lrs, chosen on validation problems and reported on disjoint test problems.

Each section prints its own baseline and verdict from the same run. Never fails: a section that raises
prints its error and the others still run.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import noise_bandit  # noqa: E402  (the bench folder is not a package)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short version of each section run")
    parser.add_argument("--gradient", action="store_true", help="also run the gradient study")
    parser.add_argument("--lm", action="store_true", help="also run the LM confirmation (about 40 minutes)")
    parser.add_argument("--budget-minutes", type=float, help="the bandit skips (and lists) settings that would end "
                        "after this many minutes, so that its report prints on a busy machine")
    args = parser.parse_args()
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    bandit = lambda: noise_bandit.run(args.quick, budget_minutes=args.budget_minutes)  # noqa: E731
    sections = [("bandit", bandit, True)]  # the bandit prints its tables as it goes
    if args.gradient:
        import noise_gradient  # noqa: PLC0415  (its SFT warm-up imports are heavy)

        sections.append(("gradient", lambda: noise_gradient.run(args.quick), False))
    if args.lm:
        import noise_lm  # noqa: PLC0415

        sections.append(("lm", lambda: noise_lm.run(args.quick), False))
    for name, run, printed in sections:
        started = time.perf_counter()
        try:
            report = run()
        except Exception:  # a bench prints, never fails: report the section's error and go on
            report, printed = f"{name} FAILED:\n{traceback.format_exc()}", False
        print(f"\n=== {name} ({time.perf_counter() - started:.0f} s)" + ("" if printed else f"\n{report}"), flush=True)


if __name__ == "__main__":
    main()
