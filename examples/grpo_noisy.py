"""GRPO from rewards that are sometimes wrong (arXiv:2510.18924), and what a noise correction does to it.

    .venv/bin/python examples/grpo_noisy.py --quick      # shorter runs: two variants, one seed
    .venv/bin/python examples/grpo_noisy.py              # longer runs, clearer differences
    .venv/bin/python examples/grpo_noisy.py --quick --seeds 3 --compare posterior   # a correction beside them

1. Supervised warm-up: a small model learns the built-in arithmetic task (``47+38=`` -> ``85``)
   on 2 worker processes, then is saved as a Hugging Face folder.
2. GRPO from that model on the same prompts and seeds: clean reward, and noisy reward (rho+ = rho- = 0.2)
   with no correction, which is the default and what the benches support (docs/grpo_noise.md: no correction
   beat a tuned learning rate and task weight). ``--compare`` adds corrected variants (``posterior``,
   ``dr_grpo``, ``grpo``; true rates) so that you can see for yourself; with one set of rates for every
   prompt, as here, ``dr_grpo`` is an exact rescale that AdamW removes (the run warns).
   Each runs under the controller: rollouts on a data-parallel layout, updates on the layout the
   policy picks, relayouts at phase boundaries when they pay.
3. Reports held-out accuracy under the *true* reward (greedy decoding) for each, prints a table,
   and writes a PNG: accuracy of the sampled completions (true reward) against step, and the
   final held-out accuracies.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from elastic.control.run import run_job, train, with_control
from elastic.core.config import MODEL_PRESETS, Config, DataConfig, OptimConfig, RuntimeConfig, TrainConfig
from elastic.core.data import ArithmeticTask
from elastic.core.layout import Layout
from elastic.driver.connect import connect_ray
from elastic.model.hf import save_hf_model
from elastic.recipes.grpo.recipe import grpo_config
from elastic.recipes.grpo.workload import GRPOWorkload
from elastic.recipes.lora.recipe import heldout_accuracy
from elastic.recipes.pretrain.recipe import load_model
from elastic.tools.progress import configure_logging

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> GRPO knobs; TRL's defaults otherwise (scale_rewards "group")
    "clean": dict(correction="none", rho_plus=0.0, rho_minus=0.0),
    "noisy, no correction (default)": dict(correction="none", rho_plus=0.2, rho_minus=0.2),
}
COMPARE = {  # --compare name -> its variant; posterior and dr_grpo weight groups, so they take no per-group std
    "posterior": ("noisy, posterior correction", dict(correction="posterior", scale_rewards="none", rho_plus=0.2,
                                                      rho_minus=0.2)),
    "dr_grpo": ("noisy, dr_grpo correction", dict(correction="dr_grpo", scale_rewards="none", rho_plus=0.2,
                                                  rho_minus=0.2)),
    "grpo": ("noisy, grpo correction", dict(correction="grpo", rho_plus=0.2, rho_minus=0.2)),
}


def warm_up(folder: Path, steps: int, workers: int) -> Config:
    cfg = Config(model=MODEL_PRESETS["mini"], data=DataConfig(dataset="arithmetic", seq_len=12, num_samples=50_000),
                 train=TrainConfig(steps=steps, global_batch=64, dtype="float32"),
                 optim=OptimConfig(lr=3e-3, warmup_steps=20, weight_decay=0.0), runtime=RuntimeConfig(workers=workers))
    marker = folder / "sft.json"
    if marker.is_file() and json.loads(marker.read_text()).get("steps") == steps:
        print(f"reusing the warmed-up model in {folder}")
        return cfg
    print(f"supervised warm-up: {steps} steps on {workers} workers")
    result = train(cfg, Layout(dp=workers))
    save_hf_model(folder, cfg.model, {k: v for k, v in result.tensors.items() if "::" not in k})
    marker.write_text(json.dumps({"steps": steps, "final_loss": result.history[-1].loss}))
    return cfg


def plot(curves: dict, final: dict, before: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=[2, 1])
    for name, values in curves.items():
        smooth = [sum(values[max(0, i - 4): i + 1]) / len(values[max(0, i - 4): i + 1]) for i in range(len(values))]
        ax.plot(range(len(values)), smooth, label=name)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("accuracy of sampled completions (true reward, 5-step mean)")
    ax.set_title("GRPO with a noisy verifier (rho+ = rho- = 0.2)")
    ax.legend(fontsize=8)
    names = list(final)
    bars.barh(range(len(names)), [final[n] for n in names], color="tab:blue")
    bars.axvline(before, color="tab:gray", ls="--", label=f"before GRPO {before:.1%}")
    bars.set_yticks(range(len(names)), names, fontsize=8)
    bars.set_xlabel("held-out accuracy (greedy, true reward)")
    bars.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs (150 GRPO steps instead of 400)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=1,
                        help="GRPO runs per variant, with seeds 0..N-1 (prompt order, sampling, reward noise); "
                             "accuracies are averaged. Each seed adds the time of one --seeds 1 run")
    parser.add_argument("--compare", default="", help="comma-separated corrections to run beside the default: "
                        f"{', '.join(COMPARE)} (none of them is supported by the benches; see docs/grpo_noise.md)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/grpo")
    args = parser.parse_args()
    variants = dict(VARIANTS)
    for key in [c.strip() for c in args.compare.split(",") if c.strip()]:
        if key not in COMPARE:
            parser.error(f"--compare {key!r} is not one of {', '.join(COMPARE)}")
        variants[COMPARE[key][0]] = COMPARE[key][1]
    sft_steps, grpo_steps = (800, 150) if args.quick else (1500, 400)
    args.out.mkdir(parents=True, exist_ok=True)
    configure_logging()
    connect_ray()
    base = args.out / "sft"
    warm_up(base, sft_steps, args.workers)
    probe = grpo_config(base=base, steps=grpo_steps, workers=args.workers, lora=False)
    task = ArithmeticTask(probe.data.seq_len, probe.data.num_samples, probe.train.seed)
    from elastic.model.hf import load_hf_model

    before = heldout_accuracy(load_model(probe, load_hf_model(base)[1]), task, n=512)
    print(f"held-out accuracy after the warm-up: {before:.1%}")

    curves, final, per_seed, extra = {}, {}, {}, {}
    for name, knobs in variants.items():
        folder = name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        per_seed[name], rates_used = [], []
        for seed in range(args.seeds):
            cfg = grpo_config(base=base, steps=grpo_steps, workers=args.workers, prompts_per_step=32, lr=1e-4,
                              lora=False, num_generations=8, max_new_tokens=4, temperature=1.0, seed=seed, **knobs)
            run_dir = args.out / (folder if seed == 0 else f"{folder}_seed{seed}")
            cfg = with_control(cfg, layout=Layout(dp=args.workers))
            print(f"\n== GRPO, {name}, seed {seed}")
            workload = GRPOWorkload(cfg)
            result, _ = run_job(cfg, workload, run_dir=str(run_dir))
            if seed == 0:
                curves[name] = [workload.stats[k]["reward_true"] for k in sorted(workload.stats)]
            per_seed[name].append(heldout_accuracy(load_model(cfg, result.tensors), task, n=512))
            rates_used.append(workload.loop.rates)
            resharding = sum(r.total_seconds for r in result.reshards)
            print(f"   held-out accuracy {per_seed[name][-1]:.1%}; time in rollouts "
                  f"{workload.seconds['rollout']:.0f} s, updates {workload.seconds['train']:.0f} s, "
                  f"reshards {resharding:.1f} s")
        final[name] = statistics.mean(per_seed[name])
        extra[name] = ("rates used: " + ", ".join(f"rho+={r.rho_plus:.3f} rho-={r.rho_minus:.3f}" for r in rates_used)
                       if knobs["correction"] != "none" else "")
    print(f"\nheld-out accuracy under the true reward ({grpo_steps} GRPO steps, 512 held-out problems, "
          f"{args.seeds} seed(s); before GRPO: {before:.1%})")
    for name in variants:
        spread = (f" +- {statistics.stdev(per_seed[name]) / len(per_seed[name]) ** 0.5:.1%} "
                  f"(seeds: {', '.join(f'{a:.1%}' for a in per_seed[name])})" if args.seeds > 1 else "")
        print(f"  {name:<38} {final[name]:6.1%}{spread}   {extra[name]}")
    lost = final["clean"] - final["noisy, no correction (default)"]
    print(f"noise cost {lost:+.1%} of held-out accuracy" if lost > 0 else
          "noise did not cost accuracy in this run (too short or too noisy to tell)")
    for name in variants:
        if name not in VARIANTS:
            gain = final[name] - final["noisy, no correction (default)"]
            print(f"  {name}: {gain:+.1%} against no correction ({args.seeds} seed(s), one lr: not evidence; "
                  "bench/grpo_noise.py tunes every arm's lr)")
    out = args.out / "grpo_noisy.png"
    plot(curves, final, before, out)
    print(f"plot: {out}")
    (args.out / "summary.json").write_text(json.dumps({"before": before, "final": final, "per_seed": per_seed,
                                                      "curves": curves, "grpo_steps": grpo_steps}, indent=1))


if __name__ == "__main__":
    main()
