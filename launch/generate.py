"""``elastic generate``: sample from a Hugging Face model folder (and a PEFT adapter) on this machine.

    elastic generate --base MODEL_DIR --adapter RUN_DIR/adapter "What is 2 + 3?"
    elastic generate --base RUN_DIR/merged --prompts prompts.jsonl --temperature 0.7 --top_p 0.9 --out out.jsonl

One prompt on the command line prints its completion. ``--prompts FILE`` (one prompt per line of a .txt,
or a JSON/JSONL/Parquet file in TRL's prompt formats: ``prompt`` as a text or a conversation, or
``messages``) writes one JSON line per prompt, ``{"prompt", "completion"}``, in order, to ``--out`` or
stdout. The chat template is on when the tokenizer has one (``--raw`` turns it off for text prompts).
Sampling is seeded per prompt (``--seed``), so the same command gives the same completions at any
``--batch_size``. Flags take TRL's and transformers' names (``--max_new_tokens``, ``--top_p``); the
dashed forms work too. The parser and the handler live here; ``launch/cli.py`` only registers them.
"""

from __future__ import annotations

import argparse
import json
import sys


def cmd_generate(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.prompts is None):
        raise ValueError("give one prompt, or --prompts FILE, to `elastic generate` (not both)")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size {args.batch_size} must be >= 1")
    from elastic.model.generate import SamplingConfig
    from elastic.model.inference import generate, load, read_prompts

    prompts = [args.prompt] if args.prompts is None else read_prompts(args.prompts)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p)  # checked before the model loads
    loaded = load(args.base, args.adapter)
    completions = generate(loaded, prompts, sampling, chat=not args.raw, seed=args.seed, batch_size=args.batch_size)
    if args.prompts is None and args.out is None:
        print(completions[0])
        return 0
    lines = "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in zip(prompts, completions,
                                                                                      strict=True))
    if args.out is None:
        sys.stdout.write(lines)
    else:
        with open(args.out, "w") as fh:
            fh.write(lines)
        print(f"wrote {len(prompts)} completions to {args.out}")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``generate`` command to ``sub`` (an argparse subparsers object)."""
    gen = sub.add_parser("generate", help="sample from a model folder (and a PEFT adapter) on this machine",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("prompt", nargs="?", help="one prompt (its completion is printed)")
    gen.add_argument("--prompts", help="a file of prompts: .txt (one per line), or .json/.jsonl/.parquet with a "
                                       "'prompt' (text or messages) or 'messages' column")
    gen.add_argument("--base", required=True, help="Hugging Face model folder (with its tokenizer)")
    gen.add_argument("--adapter", help="a PEFT LoRA adapter folder (e.g. RUN_DIR/adapter)")
    gen.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=64, help="default: 64")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    gen.add_argument("--top_p", "--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    gen.add_argument("--batch_size", "--batch-size", type=int, default=8, help="prompts per forward (default: 8)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", help="write JSON lines here (default: stdout)")
    gen.add_argument("--raw", action="store_true", help="complete text prompts as they are, without the chat template")
    gen.set_defaults(handler=cmd_generate)
    return gen
