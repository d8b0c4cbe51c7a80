"""Pre-train a small Llama-style model on Python's own standard library, on 4 worker processes.

    make setup && .venv/bin/python examples/pretrain.py                 # dp=2,tp=2 on an embedded Ray
    .venv/bin/python examples/pretrain.py --layout fsdp=4 --steps 100
    .venv/bin/python examples/pretrain.py --save runs/pretrain/base     # an HF folder lora_finetune.py starts from

It shows a progress bar (step, loss, tokens/s, workers, layout) and ends by printing a few
completions sampled from the trained model. About 3 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from elastic.control.run import train
from elastic.core.layout import Layout
from elastic.model.hf import save_hf_model
from elastic.recipes.pretrain.recipe import complete, load_model, pretrain_config
from elastic.tools.progress import configure_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="dp=2,tp=2", help="parallel layout, e.g. dp=2,tp=2 or fsdp=4")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--model", default="mini", help="model preset: tiny, mini, small, 25m, 100m")
    parser.add_argument("--save", type=Path, help="write the trained model here as a Hugging Face Llama folder")
    args = parser.parse_args()

    configure_logging()
    layout = Layout.parse(args.layout)
    cfg = pretrain_config(model=args.model, steps=args.steps, workers=layout.world)
    print(f"pre-training a {cfg.model.num_params() / 1e6:.1f}M-parameter model for {args.steps} steps "
          f"on {layout.world} workers, layout {layout}")
    result = train(cfg, layout)
    first, last = result.history[0], result.history[-1]
    print(f"loss {first.loss:.3f} -> {last.loss:.3f} in {result.seconds:.0f} s")
    model = load_model(cfg, result.tensors)
    for text in complete(model, ["import ", "def __init__(self", "    return ", "class "]):
        print("---\n" + text)
    if args.save:
        save_hf_model(args.save, cfg.model, {k: v for k, v in result.tensors.items() if "::" not in k})
        print(f"saved a Hugging Face Llama folder to {args.save}")


if __name__ == "__main__":
    main()
