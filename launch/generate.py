"""``elastic generate``: sample from a Hugging Face model folder (and a PEFT adapter) on this machine.

The parser and the handler live here; ``launch/cli.py`` only registers them (``add_parser``).
"""

from __future__ import annotations

import argparse


def cmd_generate(args: argparse.Namespace) -> int:
    from elastic.model.inference import complete

    print(complete(args.base, args.prompt, adapter=args.adapter, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, chat=not args.raw, seed=args.seed))
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``generate`` command to ``sub`` (an argparse subparsers object)."""
    gen = sub.add_parser("generate", help="sample from a model folder (and a PEFT adapter) on this machine")
    gen.add_argument("prompt")
    gen.add_argument("--base", required=True, help="Hugging Face model folder (with its tokenizer)")
    gen.add_argument("--adapter", help="a PEFT LoRA adapter folder (e.g. RUN_DIR/adapter)")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    gen.set_defaults(handler=cmd_generate)
    return gen
