"""glibc's heap in a worker process: allocations from a fixed size up are mmapped, so what a step frees goes
back to the OS instead of staying in the heap (``runtime.malloc_mmap_threshold``; 0 leaves glibc's default).

glibc serves an allocation under its mmap threshold from its heap, which keeps freed memory for later
allocations, so a process's RSS stays near the heap's high-water mark, fragments included. The threshold is
dynamic by default: it rises to the size of each mmapped chunk freed, up to 32 MiB, so after a first step the
tensors a step allocates and frees under 32 MiB (FSDP's all-gather buffers and unsharded parameters of a layer,
autocast's copies, gradients) come from the heap and stay there. Measured on 24 layers of the 494M Qwen2 shape
(LoRA, fsdp=4, mixed precision with the frozen base in bf16, ``bench/memory.py``): the heap kept 2,495 MB
between steps (``malloc_trim`` returned 2,049) and the step peaked at 3,740 MB above idle; with the threshold
fixed at 1 MiB, 455 MB between steps and a 3,740 -> 1,825 MB peak. ``mallopt(M_MMAP_THRESHOLD)`` fixes it (and
turns the dynamic adjustment off) for every later allocation of the process. The cost: each large allocation
is a fresh mapping whose pages the kernel zeroes on first touch, every step; one pair of 4-layer runs saw no
slowdown (73 s against 89 s for the second step, a noisy shared machine; ``bench/out/memory.txt``).

Linux with glibc only; elsewhere (or when libc has no ``mallopt``) a no-op. Pure Python, no torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_applied: int | None = None  # the threshold this process set (None: none yet)


def bound_heap(threshold: int) -> bool:
    """Fix this process's mmap threshold at ``threshold`` bytes (0: leave glibc's default); True when set now
    or earlier. Once per process and value: an engine build calls it every time."""
    global _applied
    if threshold <= 0 or _applied == threshold:
        return threshold > 0
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)))
    except (OSError, AttributeError):
        return False
    if ok:
        _applied = threshold
    return ok
