"""Reshard geometry: how one box pattern of a tensor meets itself between two layouts.

A box depends only on the spec's (shape, tp_dim) and the rank's (fsdp, tp) coordinate, so the
overlaps of old and new boxes are found once per pattern by a sorted sweep (``layout.grid_overlaps``)
and shared by every tensor with that pattern. A ``_Group`` holds, as numpy arrays per piece, the
sources and destinations of the tensors that share a pattern and owning stages; ``water_fill``
spreads the sending over live replicas; ``_split`` cuts pieces larger than the chunk size.
Used by ``plan.py``; pure numpy.
"""

from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass

import numpy as np

from elastic.core.boxes import Box
from elastic.core.layout import Layout, box_grid, grid_overlaps


@dataclass(frozen=True)
class _Geometry:
    """Nonempty intersections (pieces) of new and old boxes of one pattern, new-box-major."""

    new_box: np.ndarray  # int64 [P]: index into box_grid(new)
    old_box: np.ndarray  # int64 [P]: index into box_grid(old)
    numel: np.ndarray  # int64 [P]
    pieces: tuple[Box, ...]
    old_boxes: tuple[Box, ...]


@functools.lru_cache(maxsize=512)
def _geometry(shape: tuple[int, ...], tp_dim: int | None, old: Layout, new: Layout) -> _Geometry:
    overlaps = grid_overlaps(old, new, shape, tp_dim)
    new_idx, old_idx, numel = (np.array([o[k] for o in overlaps], dtype=np.int64) for k in range(3))
    return _Geometry(new_idx, old_idx, numel, tuple(o[3] for o in overlaps), box_grid(old, shape, tp_dim))


def _rank_grid(layout: Layout, stage: int, split: bool) -> np.ndarray:
    """[box, replica] -> rank for the ranks of ``stage``; rows follow ``box_grid`` order."""
    ranks = np.arange(layout.world).reshape(layout.pp, layout.dp, layout.fsdp, layout.tp)[stage]
    if split:
        return ranks.transpose(1, 2, 0).reshape(layout.fsdp * layout.tp, layout.dp)
    return ranks.transpose(1, 0, 2).reshape(layout.fsdp, layout.dp * layout.tp)


# ---- replica choice ----------------------------------------------------------------------------

def water_fill(loads: list[int], unit: int, k: int) -> list[int]:
    """How many of ``k`` requests of ``unit`` bytes each holder gets when every request in turn goes to
    the least-loaded holder (ties to the lower index), with loads growing as requests are assigned.

    Equal to running that greedy k times, in O(m log m): fill the holders up to a common level, then
    hand out the (at most m) requests left one at a time.
    """
    m = len(loads)
    if m == 1 or k == 0:
        return [k] + [0] * (m - 1) if m else []
    order = sorted(range(m), key=lambda h: (loads[h], h))
    total, s, p = k * unit, 0, 0
    while p < m:
        s += loads[order[p]]
        p += 1
        # The level over the p least-loaded holders is (s + total) / p; stop when the next one is above it.
        if p == m or loads[order[p]] * p >= s + total:
            break
    counts = [0] * m
    for h in order[:p]:
        # floor((level - load) / unit), in integers: every request given here is keyed below any not given.
        counts[h] = max(0, (s + total - p * loads[h]) // (p * unit))
    heap = [(loads[h] + counts[h] * unit, h) for h in range(m)]
    heapq.heapify(heap)
    for _ in range(k - sum(counts)):
        key, h = heapq.heappop(heap)
        counts[h] += 1
        heapq.heappush(heap, (key + unit, h))
    return counts


# ---- the plan ----------------------------------------------------------------------------------

@dataclass
class _Group:
    """Tensors with one box pattern, owning stages and itemsize, and so one set of sources and destinations.

    Stored per *piece*, not per (piece, destination), so that a train -> rollout plan, where thousands
    of replicas fetch the same pieces, stays small. A piece goes to every destination replica of its
    new box that does not hold it already; ``rows()`` expands that into rows (pair, dst, src, lo, hi):
    copy piece ``pair`` of tensors ``names[lo:hi]`` from worker index ``src`` to ``dst`` (indices into
    ``Plan.worker_ids``). Pieces with one live holder are (``bcast_pair``, ``bcast_src``). Pieces with
    replicas are ``multi_pair``, in classes of equal requests (``class_start`` offsets); class c's
    (row, tensor) requests are served in order by ``fill_src[fill_start[c]:fill_start[c + 1]]``,
    ``fill_count`` requests each. Local copy j is piece ``local_pair[j]`` of every tensor, in place.
    """

    names: tuple[str, ...]
    order: tuple[int, ...]  # each tensor's position in the specs passed to make_plan
    itemsize: int
    geometry: _Geometry
    dst_grid: np.ndarray  # [new box, replica] -> worker index (shared by the groups of a stage)
    held: np.ndarray  # worker index -> old box it holds live, or -1 (shared likewise)
    local_pair: np.ndarray
    local_dst: np.ndarray
    bcast_pair: np.ndarray
    bcast_src: np.ndarray
    multi_pair: np.ndarray
    class_start: np.ndarray
    fill_src: np.ndarray
    fill_count: np.ndarray

    def _fan_out(self, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(index into ``pairs``, pair, dst) for every destination that lacks its piece, pair-major."""
        geo = self.geometry
        dsts = self.dst_grid[geo.new_box[pairs]]
        row, col = np.nonzero(self.held[dsts] != geo.old_box[pairs][:, None])
        return row, pairs[row], dsts[row, col]

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every remote row as (pair, dst, src, lo, hi) arrays."""
        n = len(self.names)
        index, pair, dst = self._fan_out(self.bcast_pair)
        out = [(pair, dst, self.bcast_src[index], np.zeros(len(pair), np.int64), np.full(len(pair), n, np.int64))]
        if len(self.multi_pair):
            index, pair, dst = self._fan_out(self.multi_pair)
            # Lay every class's (row, tensor) requests on one line, class after class (rows come out
            # class-major, as multi_pair is sorted by class). Replica c's share ends at bounds[c]; rows
            # are cut where a share ends, which happens at most once per replica.
            row_start = np.arange(len(pair), dtype=np.int64) * n
            bounds = np.cumsum(self.fill_count)
            cuts = np.unique(np.concatenate([row_start, bounds[:-1]]))
            cuts = cuts[cuts < len(pair) * n]  # replicas that got nothing end at the line's end
            ends = np.append(cuts[1:], len(pair) * n)
            row = np.searchsorted(row_start, cuts, side="right") - 1
            src = self.fill_src[np.searchsorted(bounds, cuts, side="right")]
            out.append((pair[row], dst[row], src, cuts - row_start[row], ends - row_start[row]))
        return tuple(np.concatenate(column) for column in zip(*out, strict=True))  # type: ignore[return-value]

    def row_bytes(self, pair: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        return (hi - lo).astype(np.int64) * self.geometry.numel[pair] * self.itemsize


def _split(box: Box, nbytes: int, chunk_bytes: int) -> list[Box]:
    """Split ``box`` along its first dimension with extent > 1 into pieces of at most chunk_bytes."""
    if nbytes <= chunk_bytes:
        return [box]
    for dim, (lo, hi) in enumerate(box):
        if hi - lo > 1:
            per_row = nbytes // (hi - lo)
            rows = max(1, chunk_bytes // max(per_row, 1))
            return [box[:dim] + ((s, min(s + rows, hi)),) + box[dim + 1 :] for s in range(lo, hi, rows)]
    return [box]


def _split_count(box: Box, nbytes: int, chunk_bytes: int) -> int:
    """``len(_split(box, nbytes, chunk_bytes))`` without building the boxes."""
    if nbytes <= chunk_bytes:
        return 1
    for lo, hi in box:
        if hi - lo > 1:
            rows = max(1, chunk_bytes // max(nbytes // (hi - lo), 1))
            return -(-(hi - lo) // rows)
    return 1
