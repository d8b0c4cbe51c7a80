"""Boxes: a slice per dimension of a global tensor, the coordinates every shard is named in.

A box is a tuple of half-open ``(lo, hi)`` intervals, one per dimension of the tensor's global shape.
``slices``/``local_slices`` turn boxes into indexing keys, and ``copy_overlap`` copies the part two boxes
share from one local tensor into another: the one place shards are cut and pasted (reshards,
snapshots, checkpoints, gathers). Pure Python: no torch import (tensors are only indexed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Interval = tuple[int, int]
Box = tuple[Interval, ...]

def chunk(n: int, parts: int, index: int) -> Interval:
    """The ``index``-th of ``parts`` chunks of ``range(n)`` with torch.chunk semantics.

    Chunks have size ceil(n / parts); trailing chunks are shorter or empty. This is how
    FSDP2 and DTensor's ``Shard`` split a dimension.
    """
    size = -(-n // parts)
    return (min(index * size, n), min((index + 1) * size, n))


def balanced(n: int, parts: int, index: int) -> Interval:
    """The ``index``-th of ``parts`` near-equal pieces of ``range(n)`` (the first n % parts get one more)."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return (start, start + base + (1 if index < extra else 0))


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(hi - lo for lo, hi in box)


def box_numel(box: Box) -> int:
    return math.prod(box_shape(box))


def intersect(a: Box, b: Box) -> Box | None:
    """The overlap of two boxes, or None when they share no element."""
    out = []
    for (alo, ahi), (blo, bhi) in zip(a, b, strict=True):
        lo, hi = max(alo, blo), min(ahi, bhi)
        if lo >= hi:
            return None
        out.append((lo, hi))
    return tuple(out)


def relative(inner: Box, outer: Box) -> Box:
    """``inner`` expressed in the coordinates of ``outer`` (which must contain it)."""
    return tuple((ilo - olo, ihi - olo) for (ilo, ihi), (olo, _) in zip(inner, outer, strict=True))


def full_box(shape: Sequence[int]) -> Box:
    return tuple((0, n) for n in shape)


def slices(box: Box) -> tuple[slice, ...]:
    """``box`` as an indexing key into the global tensor."""
    return tuple(slice(lo, hi) for lo, hi in box)


def local_slices(inner: Box, outer: Box) -> tuple[slice, ...]:
    """The indexing key of ``inner`` within a local tensor that holds ``outer`` (which contains it)."""
    return slices(relative(inner, outer))


def copy_overlap(dst: Any, dst_box: Box, src: Any, src_box: Box) -> bool:
    """Copy the elements ``src`` (holding ``src_box``) shares with ``dst`` (holding ``dst_box``) into ``dst``;
    False when the boxes do not overlap. Works for tensors and for safetensors' lazy slices as ``src``."""
    piece = intersect(dst_box, src_box)
    if piece is None:
        return False
    dst[local_slices(piece, dst_box)] = src[local_slices(piece, src_box)]
    return True
