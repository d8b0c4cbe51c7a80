"""Split a reshard's traffic into rounds in which no worker runs more than ``max_streams`` sends or receives.

A link is full duplex: a worker may send and receive at the same time, each up to ``max_streams``
concurrent streams. The input is a list of edges (sender, receiver, bytes): the messages of a small
plan (``transfer_rounds``), or, for a plan at cluster scale, its flows, everything one worker sends
one peer, sent as one stream (``Plan.flows``). Rounds run one after another, and a round lasts as
long as its busiest worker needs to push its bytes through its link (streams share the link).

Scheduling is edge colouring of a bipartite multigraph (senders x receivers). Every schedule needs
at least ``lower_bound`` = max over workers of ceil(streams / max_streams) rounds; König's theorem
says that many suffice for one stream, but the exact algorithms walk alternating paths edge by
edge. First fit does well enough and is fast: edges go, largest first (so that a round's edges are
of similar size and little link time is wasted), to the first round in which neither end is full.
An edge is blocked by at most ceil(d_src/S) - 1 full rounds of its sender and as many of its
receiver, so first fit never needs more than 2 * lower_bound - 1 rounds. Full rounds are kept as
bits of one Python int per worker, so finding the first free round is a few big-int operations.

Pure Python and numpy: no torch, no processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from elastic.plan.planner import Transfer


def _dense(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    ids, inverse = np.unique(np.concatenate([src, dst]), return_inverse=True)
    return inverse[: len(src)], inverse[len(src):], len(ids)


def lower_bound(src: Sequence[int] | np.ndarray, dst: Sequence[int] | np.ndarray, max_streams: int = 1) -> int:
    """Rounds any schedule needs: the most streams one worker sends or receives, over ``max_streams``."""
    src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    if not len(src):
        return 0
    busiest = max(np.unique(src, return_counts=True)[1].max(), np.unique(dst, return_counts=True)[1].max())
    return -(-int(busiest) // max_streams)


def schedule(src: Sequence[int] | np.ndarray, dst: Sequence[int] | np.ndarray, nbytes: Sequence[int] | np.ndarray,
             max_streams: int = 1) -> np.ndarray:
    """The round of every edge: per round, each worker sends at most ``max_streams`` edges and receives
    at most ``max_streams``. Edges from a worker to itself are local copies and must not be passed."""
    if max_streams < 1:
        raise ValueError(f"max_streams={max_streams} must be at least 1 (concurrent streams per worker and direction)")
    src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    if (src == dst).any():
        raise ValueError("schedule() got an edge from a worker to itself; leave local copies out")
    rounds = np.zeros(len(src), dtype=np.int64)
    if not len(src):
        return rounds
    s, d, n = _dense(src, dst)
    order = np.argsort(-np.asarray(nbytes, dtype=np.int64), kind="stable")
    full_send, full_recv = [0] * n, [0] * n  # bit r set: the worker has max_streams edges in round r
    used_send: dict[tuple[int, int], int] = {}
    used_recv: dict[tuple[int, int], int] = {}
    out = [0] * len(src)
    for e, u, v in zip(order.tolist(), s[order].tolist(), d[order].tolist(), strict=True):
        busy = full_send[u] | full_recv[v]
        r = (~busy & (busy + 1)).bit_length() - 1  # lowest round where neither end is full
        out[e] = r
        if max_streams == 1:
            full_send[u] |= 1 << r
            full_recv[v] |= 1 << r
            continue
        used_send[u, r] = k = used_send.get((u, r), 0) + 1
        if k == max_streams:
            full_send[u] |= 1 << r
        used_recv[v, r] = k = used_recv.get((v, r), 0) + 1
        if k == max_streams:
            full_recv[v] |= 1 << r
    rounds[:] = out
    return rounds


def transfer_rounds(transfers: Sequence[Transfer], max_streams: int = 1) -> list[list[int]]:
    """Rounds of remote transfers (indices into ``transfers``; local copies are left out), each worker
    sending at most ``max_streams`` messages and receiving at most ``max_streams`` per round."""
    index = [i for i, t in enumerate(transfers) if not t.local]
    if not index:
        return []
    rounds = schedule([transfers[i].src for i in index], [transfers[i].dst for i in index],
                      [transfers[i].nbytes for i in index], max_streams)
    out: list[list[int]] = [[] for _ in range(int(rounds.max()) + 1)]
    for i, r in zip(index, rounds.tolist(), strict=True):
        out[r].append(i)
    return out


def link_seconds(src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray, bandwidth: float) -> float:
    """The floor: the busiest worker's bytes in its busier direction over its link's ``bandwidth`` (bytes/s)."""
    if not len(src):
        return 0.0
    s, d, _ = _dense(np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64))
    weights = np.asarray(nbytes, dtype=np.float64)
    return float(max(np.bincount(s, weights).max(), np.bincount(d, weights).max())) / bandwidth


def scheduled_seconds(src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray, rounds: np.ndarray,
                      bandwidth: float, round_latency: float = 0.0) -> float:
    """Rounds back to back: each lasts as long as its busiest worker's bytes in one direction take over
    ``bandwidth`` (bytes/s, shared by that worker's streams), plus ``round_latency`` seconds."""
    if not len(src):
        return 0.0
    s, d, n = _dense(np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64))
    weights = np.asarray(nbytes, dtype=np.float64)
    n_rounds = int(rounds.max()) + 1
    per_round = np.zeros(n_rounds)
    for ends in (s, d):
        load = np.bincount(rounds * n + ends, weights, n_rounds * n).reshape(n_rounds, n)
        per_round = np.maximum(per_round, load.max(axis=1))
    return float(per_round.sum()) / bandwidth + n_rounds * round_latency
