"""Failure domains: a node, with every worker on it, is lost at once, so replicas belong on different nodes.

``spread_replicas`` rearranges a placement's workers so that the data-parallel replicas of each shard (ranks
that differ only in their dp coordinate) sit on as many different nodes as it can; the boxes each rank holds
do not change, only which worker holds them. ``exposure`` says, for each node, which tensors losing that node
would leave without any live copy (recovery then needs a snapshot). Workers whose node is not known yet
(placeholders for workers not started) count as a node of their own. Pure Python.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from elastic.core.layout import Coord, Placement, TensorSpec


def _replica_sets(placement: Placement) -> list[list[int]]:
    """Rank lists that hold equal boxes: same pp, fsdp and tp coordinates, every dp."""
    layout, sets = placement.layout, []
    for pp in range(layout.pp):
        for fsdp in range(layout.fsdp):
            for tp in range(layout.tp):
                sets.append([layout.rank(Coord(pp=pp, dp=d, fsdp=fsdp, tp=tp)) for d in range(layout.dp)])
    return sets


def node_of(worker: int, nodes: Mapping[int, str]) -> str:
    """The failure domain of ``worker``: its node, or the worker alone when its node is not known."""
    return nodes.get(worker, f"worker {worker}")


def _collisions(workers: list[int], sets: list[list[int]], nodes: Mapping[int, str]) -> int:
    """Replica pairs that share a node, over every replica set."""
    total = 0
    for ranks in sets:
        seen = [node_of(workers[r], nodes) for r in ranks]
        total += len(seen) - len(set(seen))
    return total


def spread_replicas(placement: Placement, nodes: Mapping[int, str]) -> Placement:
    """``placement`` with its workers swapped between ranks until no swap puts more replicas apart (greedy)."""
    if placement.layout.dp < 2 or len({node_of(w, nodes) for w in placement.workers}) < 2:
        return placement
    sets, workers = _replica_sets(placement), list(placement.workers)
    best = _collisions(workers, sets, nodes)
    improved = True
    while improved and best:
        improved = False
        for a in range(len(workers)):
            for b in range(a + 1, len(workers)):
                workers[a], workers[b] = workers[b], workers[a]
                score = _collisions(workers, sets, nodes)
                if score < best:
                    best, improved = score, True
                else:
                    workers[a], workers[b] = workers[b], workers[a]
    return Placement(placement.layout, tuple(workers))


def survives_one_loss(placement: Placement, nodes: Mapping[int, str], specs: Iterable[TensorSpec],
                      n_layers: int) -> bool:
    """Whether every shard keeps a live copy after losing any one worker, and any one node when the placement
    spans several (on one node, losing it loses the driver's job all at once: checkpoints serve that)."""
    if placement.layout.dp < 2:
        return False
    if len({node_of(w, nodes) for w in placement.workers}) < 2:
        return True
    return not exposure(placement, nodes, specs, n_layers)


def exposure(placement: Placement, nodes: Mapping[int, str], specs: Iterable[TensorSpec],
             n_layers: int) -> dict[str, list[str]]:
    """node -> the tensors that losing it would leave with no live copy (only nodes that would leave some)."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        holders: dict = {}
        for worker, box in placement.holders(spec, n_layers):
            holders.setdefault(box, set()).add(node_of(worker, nodes))
        for box_nodes in holders.values():
            if len(box_nodes) == 1:
                node = next(iter(box_nodes))
                if spec.name not in out.get(node, []):
                    out.setdefault(node, []).append(spec.name)
    return out
