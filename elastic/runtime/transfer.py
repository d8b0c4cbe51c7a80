"""Execute one worker's part of a reshard plan over a gloo group spanning old and new workers.

Local pieces are copied in place. Remote pieces go point to point (batched ``send``/``recv`` on a
standalone gloo group), round by round as ``plan.memory_rounds`` grouped them, so buffers never
exceed the round budget. A slice that is already contiguous (any dimension-0 range of a
contiguous tensor, which is what FSDP produces) is sent from, or received into, directly: no copy.
Pieces under ``pack_below`` bytes (norms, LoRA adapters and their moments) travel packed, one
message per peer and round, because each gloo message costs a round trip whatever its size; both
sides order a pack by transfer index, so they agree on its layout without talking.

The old tensors are only read. Until the caller commits, the old engine is untouched, so a
reshard that fails midway leaves the old placement able to continue.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from elastic.core.boxes import Box, box_numel, box_shape, local_slices
from elastic.plan.memory_rounds import DISK
from elastic.plan.planner import Transfer


@dataclass
class ExecStats:
    sent_bytes: int = 0
    received_bytes: int = 0
    copied_bytes: int = 0
    disk_bytes: int = 0  # pieces read from the base folder instead of received
    disk_seconds: float = 0.0
    peak_buffer_bytes: int = 0
    seconds: float = 0.0


@dataclass
class _Views:
    """A piece's place in this worker's old tensors (the source) and its new ones (the target)."""
    old_tensors: dict[str, torch.Tensor]
    old_boxes: dict[str, Box]
    new_tensors: dict[str, torch.Tensor]
    new_boxes: dict[str, Box]

    def source(self, t: Transfer) -> torch.Tensor:
        return self.old_tensors[t.tensor][local_slices(t.box, self.old_boxes[t.tensor])]

    def target(self, t: Transfer) -> torch.Tensor:
        return self.new_tensors[t.tensor][local_slices(t.box, self.new_boxes[t.tensor])]


@dataclass
class _Round:
    """One round's posted sends and receives, the copies that follow them, and the buffers they hold."""
    pending: list = field(default_factory=list)  # gloo works to wait for
    unpack: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (target, received buffer)
    keep_alive: list[torch.Tensor] = field(default_factory=list)  # packed buffers, until their sends complete
    buffered: int = 0


def execute(work: list[tuple[int, int, Transfer]], me: int, old_tensors: dict[str, torch.Tensor],
            old_boxes: dict[str, Box], new_boxes: dict[str, Box], dtype: torch.dtype,
            group: dist.ProcessGroup | None, rank_of: dict[int, int],
            pack_below: int = 1 << 20,
            read_box: Callable[[str, Box], torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], ExecStats]:
    """Build this worker's new local tensors.

    ``work`` lists (round, tag, transfer) for every transfer this worker sends, receives, copies or (round
    ``DISK``) reads with ``read_box(tensor, global box)``; ``rank_of`` maps worker ids to ranks in ``group``.
    """
    started = time.perf_counter()
    stats = ExecStats()
    new_tensors = {name: torch.empty(box_shape(box), dtype=dtype) for name, box in new_boxes.items()}
    views = _Views(old_tensors, old_boxes, new_tensors, new_boxes)
    rounds = _copy_local_pieces(work, views, read_box, stats)
    for rnd in sorted(rounds):
        singles, packs = [], {}
        for tag, t in rounds[rnd]:
            if t.nbytes < pack_below:
                packs.setdefault((t.src, t.dst), []).append((tag, t))
            else:
                singles.append((tag, t))
        posted = _Round()
        _post_singles(singles, posted, me, views, dtype, group, rank_of, stats)
        _post_packs(packs, posted, me, views, dtype, group, rank_of, stats)
        for w in posted.pending:
            w.wait()
        for into, buffer in posted.unpack:
            into.copy_(buffer)
        stats.peak_buffer_bytes = max(stats.peak_buffer_bytes, posted.buffered)
    stats.seconds = time.perf_counter() - started
    return new_tensors, stats


def _copy_local_pieces(work, views: _Views, read_box, stats: ExecStats) -> dict[int, list[tuple[int, Transfer]]]:
    """Copy the pieces this worker holds and read the ones from disk; returns the remote ones by round."""
    rounds: dict[int, list[tuple[int, Transfer]]] = {}
    for rnd, tag, t in work:
        if rnd == DISK:
            read_started = time.perf_counter()
            views.target(t).copy_(read_box(t.tensor, t.box))
            stats.disk_bytes += t.nbytes
            stats.disk_seconds += time.perf_counter() - read_started
        elif t.local:
            views.target(t).copy_(views.source(t))
            stats.copied_bytes += t.nbytes
        else:
            rounds.setdefault(rnd, []).append((tag, t))
    return rounds


def _post_singles(singles, posted: _Round, me: int, views: _Views, dtype: torch.dtype, group, rank_of,
                  stats: ExecStats) -> None:
    """Post one message per large piece: from or into the tensor itself when the slice is contiguous."""
    for tag, t in singles:
        if t.src == me:
            view = views.source(t)
            if not view.is_contiguous():
                view = view.contiguous()
                posted.buffered += t.nbytes
            posted.pending.append(group.send([view], rank_of[t.dst], tag))
            stats.sent_bytes += t.nbytes
        else:
            into = views.target(t)
            if into.is_contiguous():
                posted.pending.append(group.recv([into], rank_of[t.src], tag))
            else:
                buffer = torch.empty(box_shape(t.box), dtype=dtype)
                posted.buffered += t.nbytes
                posted.pending.append(group.recv([buffer], rank_of[t.src], tag))
                posted.unpack.append((into, buffer))
            stats.received_bytes += t.nbytes


def _post_packs(packs, posted: _Round, me: int, views: _Views, dtype: torch.dtype, group, rank_of,
                stats: ExecStats) -> None:
    """Post one message per peer for the small pieces, ordered by tag on both sides."""
    for (src, dst), items in packs.items():
        items.sort(key=lambda item: item[0])
        tag = items[0][0]  # unique: that transfer travels in this pack and nowhere else
        if src == me:
            flat = torch.cat([views.source(t).reshape(-1) for _, t in items])
            posted.pending.append(group.send([flat], rank_of[dst], tag))
            stats.sent_bytes += sum(t.nbytes for _, t in items)
        else:
            flat = torch.empty(sum(box_numel(t.box) for _, t in items), dtype=dtype)
            posted.pending.append(group.recv([flat], rank_of[src], tag))
            offset = 0
            for _, t in items:
                n = box_numel(t.box)
                posted.unpack.append((views.target(t), flat[offset:offset + n].view(box_shape(t.box))))
                offset += n
            stats.received_bytes += sum(t.nbytes for _, t in items)
        posted.buffered += flat.numel() * flat.element_size()
        posted.keep_alive.append(flat)
