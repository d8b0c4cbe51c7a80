"""Your own model and data, through the command line: a Qwen2 folder with its tokenizer and chat
template, a JSONL of chats for LoRA fine-tuning, sampling with the adapter, then GRPO on a JSONL of
prompts of different lengths with a TRL-style reward function.

    .venv/bin/python examples/own_model.py                  # builds a tiny folder offline, then runs
    .venv/bin/python examples/own_model.py --base ~/models/Qwen2.5-0.5B-Instruct --steps 100

With no ``--base`` it writes a random tiny Qwen2 folder and trains a small BPE tokenizer (with a ChatML
template) into it, offline (``elastic/tools/tiny_hf.py``). A real downloaded folder (Llama 3.x,
SmolLM2, Qwen2.5, Qwen3, Mistral) works with the same commands, which it prints as it runs them:

    elastic train --recipe lora --base DIR --data chats.jsonl --workers 4 --steps N --storage-path runs
    elastic generate --base DIR --adapter runs/<job>/adapter "What is 12 + 30?"
    elastic train --recipe grpo --base DIR --data prompts.jsonl \
        --grpo.reward_funcs elastic.recipes.grpo.rewards:accuracy

A reward function of your own is any importable ``module:function`` with TRL's signature
``fn(prompts, completions, **columns) -> list[float]``. About 2 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_chats(path: Path, n: int = 400) -> Path:
    rng = random.Random(0)
    with path.open("w") as fh:
        for _ in range(n):
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                              {"role": "assistant", "content": f"{a + b}"}]}) + "\n")
    return path


def write_prompts(path: Path, n: int = 64) -> Path:
    rng = random.Random(1)
    with path.open("w") as fh:
        for i in range(n):
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            prompt = f"{a}+{b}=" if i % 2 else [{"role": "user", "content": f"What is {a} + {b}? Digits only."}]
            fh.write(json.dumps({"prompt": prompt, "answer": str(a + b)}) + "\n")
    return path


def run(*args: str) -> None:
    print("$ elastic " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "launch", *args], cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="a Hugging Face model folder (default: build a tiny one offline)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    out = ROOT / "runs" / "own_model"
    out.mkdir(parents=True, exist_ok=True)
    base = Path(args.base) if args.base else out / "qwen2-tiny"
    if not args.base and not (base / "tokenizer.json").is_file():
        from elastic.tools.tiny_hf import write_model, write_tokenizer

        print(f"writing a random tiny Qwen2 folder with a BPE tokenizer to {base}", flush=True)
        write_model(base, "qwen2")
        write_tokenizer(base)
    # A real folder trains with the real-model defaults (TRL's and PEFT's, printed by the run); the random tiny
    # one, which has everything to learn in a few steps, with a short context, a small batch and a high lr.
    toy_sft = [] if args.base else ["--max_length", "32", "--per_device_train_batch_size", "4",
                                    "--learning_rate", "1e-2"]
    toy_grpo = [] if args.base else ["--max_completion_length", "8", "--learning_rate", "1e-3"]
    chats = write_chats(out / "chats.jsonl")
    run("train", "--recipe", "lora", "--base", str(base), "--data", str(chats), "--workers", str(args.workers),
        "--steps", str(args.steps), "--storage-path", str(out), "--job-name", "own-lora", "--no-progress", *toy_sft)
    run("generate", "--base", str(base), "--adapter", str(out / "own-lora" / "adapter"), "What is 12 + 30?")
    prompts = write_prompts(out / "prompts.jsonl")
    run("train", "--recipe", "grpo", "--base", str(base), "--data", str(prompts), "--workers", str(args.workers),
        "--steps", "4", "--storage-path", str(out), "--job-name", "own-grpo", "--no-progress",
        "--grpo.reward_funcs", "elastic.recipes.grpo.rewards:accuracy", "--num_generations", "4", *toy_grpo)


if __name__ == "__main__":
    main()
