"""The reshard planner: a pure function from (old placement, new placement, tensor specs) to transfers.

Every state tensor has one global coordinate space. In the old placement the *distinct* boxes of
a tensor tile it exactly once (replicas hold equal boxes), so every new box is covered exactly
once by intersecting it with those distinct boxes. Each piece gets a source:

1. the destination worker itself, when it held that piece before (a local copy, no traffic);
2. otherwise the least-loaded live replica that holds it (bytes already assigned, then worker id).

Pieces larger than ``chunk_bytes`` are split along their first splittable dimension, so that a
single message never needs more than that much buffer. ``memory_rounds.py`` then groups messages
into the rounds a reshard runs, bounding the bytes any worker sends plus receives at once
(``stream_rounds.py`` bounds the concurrent streams instead: the cluster-scale model, for plans too
large to list message by message).

Scale. A 405B model has ~3,400 state tensors; on 4,096 workers that is 14M (tensor, rank) boxes
and, for a train -> rollout switch, ~300M pieces. The planner therefore never loops over them:
- a box depends only on the spec's (shape, tp_dim) and the rank's (fsdp, tp) coordinate, so the
  intersections of old and new boxes are computed once per box *pattern* by a sorted sweep (not
  all pairs), and shared by every tensor with that pattern;
- tensors with the same pattern, owning stages (old and new) and itemsize form a *group* that has
  the same sources and destinations; a group stores numpy arrays per *piece* (a piece goes to every
  destination replica that lacks it), so a plan's size grows with pieces, not with the (piece,
  destination) pairs that statistics expand on demand;
- replica choice is a water-fill per (old box, piece size): each replica gets exactly the count
  that handing the (destination, tensor) requests one at a time to the least-loaded replica would
  give, in O(replicas log replicas). Requests are taken group by group, not tensor by tensor as a
  naive planner would, so which replica serves which destination may differ; local copies, the
  pieces and the bytes each destination receives do not (``tests/unit/test_plan_scale.py``).
``Plan.transfers`` (one ``Transfer`` per tensor, piece and chunk) is built only when asked for,
which small jobs do; statistics (bytes, per-worker load, counts, flows) come from the arrays.

No processes, no torch: the plan is tested by property tests and cached per (old, new) pair.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from elastic.core.boxes import Box, box_numel
from elastic.core.layout import Layout, Placement, TensorSpec, splits_tp, stage_table
from elastic.plan.geometry import (  # noqa: F401 (water_fill and _split are re-exported for tests)
    _Geometry,
    _geometry,
    _Group,
    _rank_grid,
    _split,
    _split_count,
    water_fill,
)


@dataclass(frozen=True)
class Transfer:
    """Copy ``box`` (global coordinates) of ``tensor`` from worker ``src`` to worker ``dst``."""

    tensor: str
    src: int
    dst: int
    box: Box
    nbytes: int

    @property
    def local(self) -> bool:
        return self.src == self.dst


class MissingShards(RuntimeError):
    """Some part of the state has no live holder; it must come from a snapshot."""

    def __init__(self, missing: dict[str, list[Box]]) -> None:
        self.missing = missing
        names = ", ".join(sorted(missing)[:5]) + (" ..." if len(missing) > 5 else "")
        super().__init__(f"{len(missing)} tensors have parts held by no live worker: {names}")


@dataclass(frozen=True)
class ItemSizes:
    """Bytes per element per tensor: ``default`` for parameters, ``by_key`` for ``<param>::<key>`` tensors.

    ``make_plan`` takes either a plain int (every tensor the same dtype) or any callable spec -> bytes;
    this one is hashable, so ``cached_plan`` hits for equal sizes. ``ItemSizes.adamw()`` models bf16
    weights with fp32 AdamW moments (``state.py`` names them ``::exp_avg`` and ``::exp_avg_sq``).
    """

    default: int
    by_key: tuple[tuple[str, int], ...] = ()

    @staticmethod
    def adamw(weights: int = 2, moments: int = 4) -> ItemSizes:
        return ItemSizes(weights, (("exp_avg", moments), ("exp_avg_sq", moments)))

    def __call__(self, spec: TensorSpec) -> int:
        if "::" in spec.name:
            key = spec.name.rpartition("::")[2]
            for name, size in self.by_key:
                if name == key:
                    return size
        return self.default


Itemsize = int | Callable[[TensorSpec], int]


class Plan:
    """The transfers of one reshard, kept compactly per tensor group (see the module docstring).

    ``transfers`` lists one ``Transfer`` per (tensor, piece, chunk) in a fixed order (tensor order, then
    destination rank, then box), built on first use; the indices are the message tags. The statistics
    methods work from the compact rows, so they stay cheap for plans with hundreds of millions of pieces.
    """

    def __init__(self, old: Placement | None, new: Placement, groups: list[_Group] | None = None,
                 worker_ids: np.ndarray | None = None, chunk_bytes: int = 64 << 20) -> None:
        self.old, self.new, self.chunk_bytes = old, new, chunk_bytes
        self.groups = groups or []
        self.worker_ids = worker_ids if worker_ids is not None else np.zeros(0, dtype=np.int64)

    # ---- the message list ---------------------------------------------------------------------
    @functools.cached_property
    def transfers(self) -> list[Transfer]:
        ids = self.worker_ids.tolist()
        new_rank = {w: r for r, w in enumerate(self.new.workers)}
        keyed: list[tuple[int, int, Box, Transfer]] = []
        for g in self.groups:
            geo = g.geometry
            for p, d in zip(g.local_pair.tolist(), g.local_dst.tolist(), strict=True):
                w, piece = ids[d], geo.pieces[p]
                nbytes = int(geo.numel[p]) * g.itemsize
                keyed.extend((pos, new_rank[w], piece, Transfer(name, w, w, piece, nbytes))
                             for pos, name in zip(g.order, g.names, strict=True))
            for p, d, s, lo, hi in zip(*(column.tolist() for column in g.rows()), strict=True):
                piece, nbytes = geo.pieces[p], int(geo.numel[p]) * g.itemsize
                parts = _split(piece, nbytes, self.chunk_bytes)
                for j in range(lo, hi):
                    keyed.extend((g.order[j], new_rank[ids[d]], part,
                                  Transfer(g.names[j], ids[s], ids[d], part, box_numel(part) * g.itemsize))
                                 for part in parts)
        keyed.sort(key=lambda item: item[:3])
        return [item[3] for item in keyed]

    @property
    def remote(self) -> list[Transfer]:
        return [t for t in self.transfers if not t.local]

    def for_worker(self, worker: int) -> list[tuple[int, Transfer]]:
        """(message tag, transfer) for every transfer this worker sends, receives or copies."""
        return [(i, t) for i, t in enumerate(self.transfers) if worker in (t.src, t.dst)]

    # ---- statistics from the compact rows ---------------------------------------------------
    def bytes_moved(self) -> int:
        return int(self.load_arrays()[0].sum())

    def bytes_copied(self) -> int:
        """Bytes that stay on their worker (local copies)."""
        return sum(int(g.geometry.numel[g.local_pair].sum()) * g.itemsize * len(g.names) for g in self.groups)

    def bytes_by_worker(self) -> dict[int, tuple[int, int]]:
        """worker -> (bytes sent, bytes received) over the network, for every worker with remote traffic."""
        sent, received = self.load_arrays()
        busy = np.flatnonzero((sent > 0) | (received > 0))
        ids = self.worker_ids
        return {int(ids[i]): (int(sent[i]), int(received[i])) for i in busy}

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(bytes sent, bytes received) per entry of ``worker_ids``, as int64 arrays."""
        return self._loads

    def copied_array(self) -> np.ndarray:
        """Bytes each entry of ``worker_ids`` copies locally (from its own old shards)."""
        out = np.zeros(len(self.worker_ids), dtype=np.int64)
        for g in self.groups:
            nbytes = (g.geometry.numel[g.local_pair] * g.itemsize * len(g.names)).astype(np.float64)
            out += np.rint(np.bincount(g.local_dst, nbytes, len(out))).astype(np.int64)
        return out

    @functools.cached_property
    def _loads(self) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.worker_ids)
        sent, received = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        for g in self.groups:
            pair, dst, src, lo, hi = g.rows()
            nbytes = g.row_bytes(pair, lo, hi).astype(np.float64)  # exact: totals stay far below 2**53
            sent += np.rint(np.bincount(src, nbytes, n)).astype(np.int64)
            received += np.rint(np.bincount(dst, nbytes, n)).astype(np.int64)
        return sent, received

    def counts(self) -> tuple[int, int]:
        """(remote messages, local copies): ``len(self.remote)`` and the rest, without building them."""
        remote = local = 0
        for g in self.groups:
            geo = g.geometry
            chunks = np.array([_split_count(piece, int(n) * g.itemsize, self.chunk_bytes)
                               for piece, n in zip(geo.pieces, geo.numel.tolist(), strict=True)], dtype=np.int64)
            pair, _, _, lo, hi = g.rows()
            remote += int(((hi - lo).astype(np.int64) * chunks[pair]).sum())
            local += len(g.local_pair) * len(g.names)
        return remote, local

    def flows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(src, dst, bytes): remote bytes summed per (sender, receiver) pair, worker ids as int64 arrays.

        One flow is what a worker would send to one peer as a single stream; ``rounds.py`` schedules them.
        """
        n = max(len(self.worker_ids), 1)
        keys, sizes = [np.zeros(0, dtype=np.int64)], [np.zeros(0)]
        for g in self.groups:
            pair, dst, src, lo, hi = g.rows()
            key, inverse = np.unique(src.astype(np.int64) * n + dst, return_inverse=True)
            keys.append(key)
            sizes.append(np.bincount(inverse, g.row_bytes(pair, lo, hi).astype(np.float64), len(key)))
        key, inverse = np.unique(np.concatenate(keys), return_inverse=True)
        nbytes = np.rint(np.bincount(inverse, np.concatenate(sizes), len(key))).astype(np.int64)
        return self.worker_ids[key // n], self.worker_ids[key % n], nbytes


# ---- planning ------------------------------------------------------------------------------

class _Side:
    """Per (stage, tp-split) views of one placement: box -> replica workers, worker -> box held.

    Memoised per instance (one make_plan call): the same views serve every group of tensors.
    """

    def __init__(self, placement: Placement, dense: np.ndarray, n_workers: int, alive: np.ndarray | None) -> None:
        self.layout, self.dense, self.n_workers, self.alive = placement.layout, dense, n_workers, alive
        self._grids: dict[tuple[int, bool], np.ndarray] = {}
        self._holders: dict[tuple[int, bool], tuple[np.ndarray, np.ndarray, list[list[int]]]] = {}

    def grid(self, stage: int, split: bool) -> np.ndarray:
        """[box, replica] -> dense worker index."""
        if (stage, split) not in self._grids:
            self._grids[stage, split] = self.dense[_rank_grid(self.layout, stage, split)]
        return self._grids[stage, split]

    def holders(self, stage: int, split: bool) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
        """(held, first, live): the box each live worker holds (-1: none), each box's first live holder
        (-1: none) and each box's live holders in worker-id order."""
        if (stage, split) not in self._holders:
            grid = self.grid(stage, split)
            ranks = _rank_grid(self.layout, stage, split)
            ok = self.alive[ranks] if self.alive is not None else np.ones(grid.shape, dtype=bool)
            held = np.full(self.n_workers, -1, dtype=np.int64)
            boxes = np.broadcast_to(np.arange(grid.shape[0])[:, None], grid.shape)
            held[grid[ok]] = boxes[ok]
            live = [sorted(row[mask].tolist()) for row, mask in zip(grid, ok, strict=True)]
            first = np.array([h[0] if h else -1 for h in live], dtype=np.int64)
            self._holders[stage, split] = (held, first, live)
        return self._holders[stage, split]


def _stages(layout: Layout, specs: tuple[TensorSpec, ...], n_layers: int) -> list[int]:
    table = stage_table(layout, n_layers)
    out = []
    for spec in specs:
        if spec.owner == "layer" and 0 <= spec.layer < n_layers:
            out.append(table[spec.layer])
        else:
            out.append(layout.stage_of(spec, n_layers))  # embed / head, or raises for a bad layer
    return out


def make_plan(old: Placement | None, new: Placement, specs: tuple[TensorSpec, ...], n_layers: int,
              itemsize: Itemsize, alive: frozenset[int] | None = None, chunk_bytes: int = 64 << 20) -> Plan:
    """Transfers that build every new rank's boxes from the old placement's live workers.

    ``itemsize`` is bytes per element: an int for every tensor, or a callable spec -> bytes (such as
    ``ItemSizes.adamw()``). ``alive`` restricts sources (None: every old worker is alive). Raises
    MissingShards if some part of a tensor has no live holder. With ``old=None`` the plan is empty.
    """
    if old is None:
        return Plan(None, new, chunk_bytes=chunk_bytes)
    size_of = itemsize if callable(itemsize) else (lambda _spec: itemsize)
    worker_ids = np.array(sorted(set(old.workers) | set(new.workers)), dtype=np.int64)
    position = {w: i for i, w in enumerate(worker_ids.tolist())}  # dense index order == worker id order
    old_alive = None if alive is None else np.array([w in alive for w in old.workers], dtype=bool)
    olds = _Side(old, np.array([position[w] for w in old.workers], dtype=np.int64), len(worker_ids), old_alive)
    news = _Side(new, np.array([position[w] for w in new.workers], dtype=np.int64), len(worker_ids), None)

    members: dict[tuple, list[int]] = {}
    for i, (spec, so, sn) in enumerate(zip(specs, _stages(old.layout, specs, n_layers),
                                           _stages(new.layout, specs, n_layers), strict=True)):
        members.setdefault((spec.shape, spec.tp_dim, so, sn, size_of(spec)), []).append(i)

    loads = np.zeros(len(worker_ids), dtype=np.int64)  # bytes each worker has been given to send
    missing: dict[str, list[Box]] = {}
    groups = []
    for (shape, tp_dim, so, sn, size), idx in members.items():
        names = tuple(specs[i].name for i in idx)
        group = _plan_group(names, tuple(idx), size, _geometry(shape, tp_dim, old.layout, new.layout),
                            olds, news, so, sn, splits_tp(old.layout, tp_dim), splits_tp(new.layout, tp_dim),
                            loads, missing)
        groups.append(group)
    if missing:
        raise MissingShards(missing)
    return Plan(old, new, groups=groups, worker_ids=worker_ids, chunk_bytes=chunk_bytes)


def _plan_group(names: tuple[str, ...], order: tuple[int, ...], itemsize: int, geo: _Geometry, olds: _Side,
                news: _Side, so: int, sn: int, old_split: bool, new_split: bool, loads: np.ndarray,
                missing: dict[str, list[Box]]) -> _Group:
    held, first, live = olds.holders(so, old_split)
    grid = news.grid(sn, new_split)
    dsts = grid[geo.new_box]  # [pair, replica] destination workers
    local = held[dsts] == geo.old_box[:, None]  # the destination held this very old box: copy in place
    local_pair, col = np.nonzero(local)
    local_dst = dsts[local_pair, col]
    n = len(names)
    need = (~local).sum(axis=1)  # destinations that must receive each piece
    nlive = np.array([len(h) for h in live], dtype=np.int64)[geo.old_box]
    lost = np.flatnonzero((nlive == 0) & (need > 0))
    if len(lost):  # no live worker holds these pieces: the caller must use a snapshot
        boxes = [geo.old_boxes[o] for o in sorted(set(geo.old_box[lost].tolist()))]
        for name in names:
            missing.setdefault(name, []).extend(boxes)
    unit = geo.numel * itemsize  # bytes per tensor of each piece
    bcast_pair = np.flatnonzero((nlive == 1) & (need > 0))  # one possible source: no choice to make
    bcast_src = first[geo.old_box[bcast_pair]]
    loads += np.rint(np.bincount(bcast_src, (unit * need * n)[bcast_pair].astype(np.float64),
                                 len(loads))).astype(np.int64)

    # Pieces with replicas: one class per (old box, piece size), i.e. equal requests that the same
    # replicas can serve, filled class by class. The class's requests are (destination, tensor) pairs,
    # laid out in the order rows() expands them, and each replica serves one contiguous run.
    multi = np.flatnonzero((nlive > 1) & (need > 0))
    cls_key = geo.old_box[multi] * (int(unit.max(initial=0)) + 1) + unit[multi]
    by_class = np.argsort(cls_key, kind="stable")
    multi_pair = multi[by_class]
    cuts = np.flatnonzero(np.diff(cls_key[by_class])) + 1
    class_start = np.concatenate([[0], cuts, [len(multi_pair)]]) if len(multi_pair) else np.zeros(1, np.int64)
    fill_src: list[int] = []
    fill_count: list[int] = []
    for c in range(len(class_start) - 1):
        pairs = multi_pair[class_start[c]:class_start[c + 1]]
        holders = live[int(geo.old_box[pairs[0]])]
        per = int(unit[pairs[0]])
        counts = water_fill(loads[holders].tolist(), per, int(need[pairs].sum()) * n)
        loads[holders] += np.array(counts, dtype=np.int64) * per
        fill_src += holders
        fill_count += counts
    i32 = functools.partial(np.asarray, dtype=np.int32)
    return _Group(names, order, itemsize, geo, grid, held, i32(local_pair), i32(local_dst), i32(bcast_pair),
                  i32(bcast_src), i32(multi_pair), class_start.astype(np.int64), i32(fill_src),
                  np.asarray(fill_count, dtype=np.int64))


@functools.lru_cache(maxsize=64)
def cached_plan(old: Placement | None, new: Placement, specs: tuple[TensorSpec, ...], n_layers: int,
                itemsize: Itemsize, alive: frozenset[int] | None = None, chunk_bytes: int = 64 << 20) -> Plan:
    """``make_plan`` cached per (old, new, specs, alive): repeated transitions plan once."""
    return make_plan(old, new, specs, n_layers, itemsize, alive, chunk_bytes)

