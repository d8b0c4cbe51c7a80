"""GRPO rollouts: the shared prefill against the repeat-G prefill, in one process, same work.

A rollout worker samples G completions of each of its prompts. The current sampler
(``sample(..., share_prefill=True)``) prefills each distinct prompt once, after their common prefix
once, and copies the KV cache to the G rows; the baseline (``share_prefill=False``) prefills the
whole batch, each prompt repeated G times. Both decode the same B = P * G rows.

For each case it prints completion tokens per second of both, and the ratio (shared / repeat-G),
on the 'mini' model preset (float32, random init, one torch thread like a worker) with GRPO's
defaults (temperature 1, max_new_tokens 6, the EOS stop). The batch is the Rollout task's own
(``recipes/grpo/worker.rollout_batch``: the same prompts, the same per-completion generators), so
both paths sample the same tokens, which is checked; a rollout with ``num_iterations`` 1 and
``beta`` 0 (the defaults) is this sampling and nothing else. Prompts: the built-in arithmetic
task's shape (BOS + "ab+cd=", 7 tokens), alone or after a 64-token few-shot header; P = 2 is the
default 8 prompts per step on 4 workers, P = 8 one worker's whole step.

Timing: warm-up runs of both excluded, then ``--repeats`` rollouts of each, interleaved (the order
alternates), median. Target: >= 1.5x at G = 8. Never fails on timing.

Usage: python bench/rollout.py [--repeats 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from elastic.core.config import MODEL_PRESETS
from elastic.core.tokenizer import load_tokenizer
from elastic.model.generate import MIN_SHARED_TOKENS, SamplingConfig, prefill, sample
from elastic.model.init import init_tensor
from elastic.model.llama import LlamaStage, padding_for, tensor_specs
from elastic.recipes.grpo.worker import rollout_batch

TARGET = 1.5
CASES = [  # (name, prompts per worker, header tokens, G values)
    ("arithmetic", 2, 0, (2, 4, 8)),
    ("arithmetic", 8, 0, (8,)),
    ("64-token header + arith.", 2, 64, (2, 4, 8)),
    ("64-token header + arith.", 8, 64, (8,)),
]


def build_model() -> LlamaStage:
    cfg = MODEL_PRESETS["mini"]
    model = LlamaStage(cfg)
    with torch.no_grad():
        for spec, (_, p) in zip(tensor_specs(cfg), model.named_parameters(), strict=True):
            p.copy_(init_tensor(spec, cfg, 0, torch.float32))
    return model.eval()


def prompts(tok, count: int, header: int) -> list[tuple[int, list[int], None]]:
    """``count`` arithmetic prompts (BOS + 'ab+cd='), after a few-shot header of exactly ``header`` tokens."""
    rng = random.Random(0)
    pairs = [(rng.randrange(10, 50), rng.randrange(10, 50)) for _ in range(20)]
    shots = "".join(f"{a}+{b}={a + b}\n" for a, b in pairs)
    head = tok.encode(shots)[:header]
    out = []
    for i in range(count):
        a, b = rng.randrange(10, 50), rng.randrange(10, 50)
        out.append((i, [tok.bos_id] + head + tok.encode(f"{a}+{b}="), None))
    return out


class Passes:
    """The model, recording the shape of each prefill pass ([rows, tokens])."""

    def __init__(self, model) -> None:
        self.model, self.shapes = model, []

    def __call__(self, x, start=0, cache=None, pad=None):
        self.shapes.append("x".join(map(str, x.shape)))
        return self.model(x, start, cache, pad)


def measure(model, items, groups: int, cfg: SamplingConfig, repeats: int) -> dict:
    ids, mask, _ = rollout_batch(items, groups, seed=0, grpo_step=0)
    pad = None if mask is None else padding_for(mask)

    def run(share: bool):
        gens = rollout_batch(items, groups, seed=0, grpo_step=0)[2]  # fresh generators, as in a rollout
        started = time.perf_counter()
        tokens, lengths = sample(model, ids, cfg, gens, prompt_mask=mask, share_prefill=share)
        middle = time.perf_counter()
        prefill(model, ids, pad, share)  # the prefill alone, for the breakdown
        return middle - started, time.perf_counter() - middle, tokens, lengths

    for _ in range(2):  # warm-up, both paths
        run(True), run(False)
    times = {True: [], False: []}
    prefills = {True: [], False: []}
    out = {}
    for r in range(repeats):
        for share in ((True, False) if r % 2 else (False, True)):
            seconds, prefill_seconds, tokens, lengths = run(share)
            times[share].append(seconds)
            prefills[share].append(prefill_seconds)
            out[share] = (tokens, lengths)
    passes = {}
    for share in (True, False):
        recorder = Passes(model)
        prefill(recorder, ids, pad, share)
        passes[share] = " + ".join(recorder.shapes)
    same = torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
    return {"shared": statistics.median(times[True]), "repeated": statistics.median(times[False]),
            "prefill": {k: statistics.median(v) for k, v in prefills.items()}, "passes": passes,
            "tokens": int(out[True][1].sum()), "same": same, "width": ids.shape[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="timed rollouts of each path per case")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a worker's default is 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = build_model(), load_tokenizer("")
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=1.0, stop_ids=(tok.eos_id,))
    console = Console(width=200)
    table = Table(title=f"GRPO rollout throughput, 'mini' ({MODEL_PRESETS['mini'].num_params() / 1e6:.1f}M parameters, "
                        f"float32, {args.threads} thread), max_new_tokens 6: shared prefill against repeat-G prefill "
                        f"(median of {args.repeats})")
    passes = "prefill passes, repeat-G -> shared"
    for col in ("prompts", "P", "G", "prompt len", passes, "new tokens", "repeat-G ms", "shared ms",
                "prefill alone ms", "repeat-G tok/s", "shared tok/s", "ratio", "same tokens"):
        left = col in ("prompts", passes)
        table.add_column(col, justify="left" if left else "right", no_wrap=left)
    verdicts = []
    for name, count, header, group_sizes in CASES:
        items = prompts(tok, count, header)
        for groups in group_sizes:
            r = measure(model, items, groups, cfg, args.repeats)
            ratio = r["repeated"] / r["shared"]
            table.add_row(name, str(count), str(groups), str(r["width"]),
                          f"{r['passes'][False]} -> {r['passes'][True]}", str(r["tokens"]),
                          f"{r['repeated'] * 1e3:.1f}", f"{r['shared'] * 1e3:.1f}",
                          f"{r['prefill'][False] * 1e3:.1f} / {r['prefill'][True] * 1e3:.1f}",
                          f"{r['tokens'] / r['repeated']:,.0f}", f"{r['tokens'] / r['shared']:,.0f}",
                          f"{ratio:.2f}x", "yes" if r["same"] else "NO")
            if groups == 8:
                verdicts.append((f"{name}, P={count}", ratio))
    console.print(table)
    console.print("new tokens: completion tokens per rollout (the tok/s count). "
                  "ratio: shared-prefill tokens/s over repeat-G tokens/s, both measured in this run on the same "
                  "batches (same prompts, same generators, same tokens generated). 'prefill alone': repeat-G / "
                  "shared, timed separately (an indication: noisier than the rollouts). The decode (max_new_tokens "
                  "- 1 passes over all B rows, and a draw per row and token) is the same work in both, so with short "
                  "prompts it bounds the gain. A common prefix gets its own pass when it saves >= "
                  f"{MIN_SHARED_TOKENS} prompt tokens.")
    for case, ratio in verdicts:
        console.print(f"G=8, {case}: {ratio:.2f}x; target >= {TARGET}x " + ("met" if ratio >= TARGET else "NOT met"))


if __name__ == "__main__":
    main()
