"""What a worker may use and what a reshard round may move: budgets from the nodes' memory, and the bound on a
round's bytes that the workers' headroom allows.

``node_budgets``: bytes per worker above its idle process, from what each node has (as Ray reports it), divided
among the job's workers there, with headroom, less their idle RSS. ``held_bytes`` and ``round_bound``: the state a
worker holds in a placement, and so how many bytes per round a reshard may send plus receive once each worker
taking part holds its old and its new state (``plan/memory_rounds.py`` cuts a plan into such rounds). The
predicted peaks these budgets are compared with are ``plan/memory.py``'s. Pure Python, no torch, no processes.
"""

from __future__ import annotations

from elastic.core.boxes import box_numel
from elastic.core.layout import Placement
from elastic.plan.memory import MemoryModel

HEADROOM = 0.8  # share of a node's memory the workers placed there may use; the rest is the OS, driver, Ray


def node_budgets(nodes: dict[int, str], node_bytes: dict[str, int], idle: dict[int, int],
                 headroom: float = HEADROOM) -> dict[int, int]:
    """worker -> bytes above its idle process it may use: ``headroom`` of its node's memory, less the idle RSS
    of the job's workers there, divided among them. Workers on a node of unknown size get none."""
    on_node: dict[str, list[int]] = {}
    for worker, node in nodes.items():
        on_node.setdefault(node, []).append(worker)
    known = [v for v in idle.values() if v > 0]
    typical = sum(known) // len(known) if known else 0
    budgets = {}
    for node, workers in on_node.items():
        if node_bytes.get(node, 0) <= 0:
            continue
        free = headroom * node_bytes[node] - sum(idle.get(w) or typical for w in workers)
        for w in workers:
            budgets[w] = max(1, int(free / len(workers)))  # 1 byte, not 0: nothing fits (0 reads as no limit)
    return budgets


def held_bytes(model: MemoryModel, placement: Placement | None, worker: int) -> int:
    """Bytes of the state (weights, frozen weights, AdamW moments) ``worker`` holds in ``placement``, at
    ``train.dtype`` (as a reshard moves and stages it, frozen weights stored in bf16 included)."""
    rank = placement.rank_of(worker) if placement is not None else None
    if rank is None:
        return 0
    n_layers, total = model.cfg.model.n_layers, 0
    for spec in model.specs:
        box = placement.box(spec, rank, n_layers)
        if box is not None:
            total += box_numel(box) * model.itemsize * (3 if spec.trainable else 1)
    return total


def round_bound(model: MemoryModel, budgets: dict[int, int], old: Placement | None, new: Placement,
                movers: list[int]) -> int:
    """Bytes a worker may send plus receive per reshard round from ``old`` to ``new``: what the smallest headroom
    among ``movers`` leaves once each holds its old and its new state (and the calibrated overhead), at most
    ``runtime.reshard_round_bytes`` and at least ``runtime.reshard_chunk_bytes`` (one message). Without a budget
    for any of them, ``runtime.reshard_round_bytes``."""
    runtime = model.cfg.runtime
    spare = [budgets[w] - held_bytes(model, old, w) - held_bytes(model, new, w) - int(model.overhead)
             for w in movers if w in budgets]
    if not spare:
        return runtime.reshard_round_bytes
    return max(runtime.reshard_chunk_bytes, min(runtime.reshard_round_bytes, min(spare)))
