"""Peak memory of GRPO's per-token log-probs, forward and backward, at a real vocabulary: whole logits against
the stage's ``targets=`` forward (``model/loss.lm_token_logps``, design.md item 44).

One process per measurement (spawned, one torch thread, glibc's heap bounded at 1 MiB as a worker's,
``runtime/heap.py``) holds the last stage of a Qwen2.5-0.5B-shaped model, the final norm and an untied LM head
(vocabulary 151,936, dim 896; frozen, as under LoRA, unless ``--trained-head``), and the final hidden states of
8 completions x 256 tokens after a one-token prompt (2,048 scored positions). It runs the policy step's
log-probs with entropies, under bf16 autocast (``train.mixed_precision = "bf16"``) or in float32, then the
backward of a weighted sum of the log-probs to the hidden states (and head). ``before``: the stage's whole
logits, then the float32 ``log_softmax``, gather and entropy that ``recipes/grpo/worker.token_logps`` used to
take; ``after``: ``stage(hidden, targets=..., with_entropy=True)``. Printed: the peak resident memory above the
process's RSS just before the forward (Linux's VmHWM, reset there), the seconds, and the largest difference of
the log-probs from ``before``'s.

Usage: nice -n 10 .venv/bin/python bench/grpo_logps_memory.py [--rows 8] [--completion 256] [--dtypes bf16,float32]
       [--trained-head]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.multiprocessing as mp

VOCAB, DIM = 151_936, 896


def _measure(variant: str, dtype: str, rows: int, completion: int, trained_head: bool, queue) -> None:
    import torch
    import torch.nn.functional as F

    from elastic.core.config import ModelConfig
    from elastic.model.llama import LlamaStage
    from elastic.runtime.heap import bound_heap
    from elastic.runtime.rss import PeakWatch, current

    torch.set_num_threads(1)
    bound_heap(2**20)
    cfg = ModelConfig(vocab_size=VOCAB, dim=DIM, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864)
    torch.manual_seed(0)
    stage = LlamaStage(cfg, range(0), first=False, last=True)
    stage.lm_head.weight.requires_grad_(trained_head)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(rows, completion + 1, DIM, generator=g).requires_grad_()
    targets = torch.randint(0, VOCAB, (rows, completion), generator=g)
    coef = torch.randn(rows, completion, generator=g)
    watch, before = PeakWatch(), current()
    watch.start()
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        if variant == "before":
            logits = stage(hidden)[:, :-1]
            logits = logits.float() if logits.dtype == torch.bfloat16 else logits
            every = F.log_softmax(logits, dim=-1)
            logps = torch.gather(every, -1, targets.unsqueeze(-1)).squeeze(-1)
            with torch.no_grad():
                entropy = -(every.exp() * every).sum(-1)
            del logits, every
        else:
            logps, entropy = stage(hidden, targets=targets, with_entropy=True)
    (logps * coef).sum().backward()
    seconds = time.perf_counter() - started
    queue.put((watch.peak() - before, seconds, logps.detach().numpy(), entropy.numpy()))  # numpy: plain pickles


def _run(variant: str, dtype: str, args) -> tuple:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(variant, dtype, args.rows, args.completion, args.trained_head, queue))
    proc.start()
    try:
        return queue.get(timeout=1800)
    finally:
        proc.join(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--completion", type=int, default=256)
    parser.add_argument("--dtypes", default="bf16,float32")
    parser.add_argument("--trained-head", action="store_true")
    args = parser.parse_args()
    positions = args.rows * args.completion
    print(f"vocab {VOCAB}, dim {DIM}, {args.rows} x {args.completion} = {positions} positions, head "
          f"{'trained' if args.trained_head else 'frozen'}; one float32 [positions, vocab] tensor: "
          f"{positions * VOCAB * 4 / 2**20:,.0f} MB")
    print(f"{'compute':8} {'log-probs':28} {'peak MB':>9} {'seconds':>8} {'max |dlogp|':>12} {'max |dH|':>10}")
    for dtype in args.dtypes.split(","):
        whole = None
        for variant, name in (("before", "whole logits (before)"), ("after", "targets=, chunked (after)")):
            peak, seconds, logps, entropy = _run(variant, dtype, args)
            logps, entropy = torch.from_numpy(logps), torch.from_numpy(entropy)
            if whole is None:
                whole = (logps, entropy)
            dlogp = (logps - whole[0]).abs().max().item()
            dh = (entropy - whole[1]).abs().max().item()
            print(f"{dtype:8} {name:28} {peak / 2**20:9,.0f} {seconds:8.1f} {dlogp:12.2e} {dh:10.2e}")


if __name__ == "__main__":
    main()
