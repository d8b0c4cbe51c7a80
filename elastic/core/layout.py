"""Layouts and placements: which rank holds which box of every tensor (boxes are in ``boxes.py``).

A ``Layout`` is a frozen value of parallel degrees (dp replicate, fsdp shard, tp tensor,
pp pipeline) plus micro-batching. A ``Placement`` is a layout filled with stable worker ids.
For every named tensor (``TensorSpec``, global shape) and every rank, ``Placement.box`` gives
the slice of the global tensor that rank holds, or ``None`` when the rank's pipeline stage
does not own the tensor. Replicas (dp) hold equal boxes. Resharding, checkpoints and the
parallel code all use these boxes, and the parallel code asserts that torch agrees with them.

Rank order is pp (outermost), dp, fsdp, tp (innermost): tensor-parallel peers are neighbours.

Pure Python: no torch, no processes.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from elastic.core.boxes import Box, Interval, balanced, box_numel, chunk, full_box, intersect

if TYPE_CHECKING:
    from elastic.core.config import ModelConfig

DIMS = ("pp", "dp", "fsdp", "tp")


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor of the training state with its global shape and sharding rules.

    ``tp_dim`` is the dimension tensor parallelism splits (None: replicated across tp).
    ``owner`` says which pipeline stage holds it: "embed" (first stage), "head" (last
    stage) or "layer" (the stage that holds ``layer``). FSDP always splits dimension 0 of
    the tensor-parallel shard, as FSDP2 does.
    """

    name: str
    shape: tuple[int, ...]
    tp_dim: int | None = None
    owner: str = "layer"
    layer: int = -1
    trainable: bool = True

    def renamed(self, name: str) -> TensorSpec:
        return TensorSpec(name, self.shape, self.tp_dim, self.owner, self.layer, self.trainable)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Coord:
    pp: int
    dp: int
    fsdp: int
    tp: int


@dataclass(frozen=True, order=True)
class Layout:
    """Parallel degrees. ``world = dp * fsdp * tp * pp``; ``microbatches`` per data-parallel rank."""

    dp: int = 1
    fsdp: int = 1
    tp: int = 1
    pp: int = 1
    microbatches: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "fsdp", "tp", "pp", "microbatches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"layout {name}={value!r} must be a positive integer")

    # ---- naming -------------------------------------------------------------------------
    @staticmethod
    def parse(text: str) -> Layout:
        """Parse ``"dp=2,tp=2"`` (also ``mb=4`` for microbatches). Omitted degrees are 1."""
        keys = {"dp": "dp", "fsdp": "fsdp", "tp": "tp", "pp": "pp", "mb": "microbatches",
                "microbatches": "microbatches"}
        values: dict[str, int] = {}
        text = text.strip()
        if not text:
            raise ValueError("empty layout string; write degrees like 'dp=2,tp=2' (keys: dp, fsdp, tp, pp, mb)")
        for part in text.split(","):
            match = re.fullmatch(r"\s*([a-z]+)\s*=\s*(\d+)\s*", part)
            if not match or match.group(1) not in keys:
                raise ValueError(
                    f"malformed layout part {part.strip()!r} in {text!r}; write degrees like "
                    "'dp=2,tp=2' using the keys dp, fsdp, tp, pp, mb"
                )
            key = keys[match.group(1)]
            if key in values:
                raise ValueError(f"layout {text!r} sets {match.group(1)} twice")
            values[key] = int(match.group(2))
        return Layout(**values)

    def __str__(self) -> str:
        parts = [f"{d}={getattr(self, d)}" for d in ("dp", "fsdp", "tp", "pp") if getattr(self, d) > 1]
        if self.microbatches > 1:
            parts.append(f"mb={self.microbatches}")
        return ",".join(parts) or "dp=1"

    @property
    def world(self) -> int:
        return self.dp * self.fsdp * self.tp * self.pp

    @property
    def data_parallel(self) -> int:
        """Ranks that see different data: dp replicas times fsdp shards."""
        return self.dp * self.fsdp

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.pp, self.dp, self.fsdp, self.tp)

    def with_microbatches(self, microbatches: int) -> Layout:
        return Layout(self.dp, self.fsdp, self.tp, self.pp, microbatches)

    # ---- ranks --------------------------------------------------------------------------
    def coord(self, rank: int) -> Coord:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} is outside layout {self} with world {self.world}")
        rank, tp = divmod(rank, self.tp)
        rank, fsdp = divmod(rank, self.fsdp)
        pp, dp = divmod(rank, self.dp)
        return Coord(pp=pp, dp=dp, fsdp=fsdp, tp=tp)

    def rank(self, coord: Coord) -> int:
        return ((coord.pp * self.dp + coord.dp) * self.fsdp + coord.fsdp) * self.tp + coord.tp

    def data_index(self, rank: int) -> int:
        """Which of the ``data_parallel`` slices of the global batch this rank consumes."""
        c = self.coord(rank)
        return c.dp * self.fsdp + c.fsdp

    def stage_layers(self, stage: int, n_layers: int) -> range:
        lo, hi = balanced(n_layers, self.pp, stage)
        return range(lo, hi)

    def stage_of(self, spec: TensorSpec, n_layers: int) -> int:
        if spec.owner == "embed":
            return 0
        if spec.owner == "head":
            return self.pp - 1
        for stage in range(self.pp):
            if spec.layer in self.stage_layers(stage, n_layers):
                return stage
        raise ValueError(f"tensor {spec.name} names layer {spec.layer}, outside 0..{n_layers - 1}")

    # ---- validation ---------------------------------------------------------------------
    def validate(self, model: ModelConfig, global_batch: int) -> None:
        """Raise ValueError, showing the arithmetic, if this layout cannot run the model."""
        for what, size in (("n_heads", model.n_heads), ("n_kv_heads", model.n_kv_heads),
                           ("ffn_dim", model.ffn_dim)):
            if size % self.tp:
                raise ValueError(
                    f"layout {self}: tp={self.tp} does not divide {what}={size} "
                    f"({size} % {self.tp} = {size % self.tp}); choose tp among the common divisors "
                    f"of n_heads={model.n_heads}, n_kv_heads={model.n_kv_heads} and ffn_dim={model.ffn_dim}"
                )
        if self.pp > model.n_layers:
            raise ValueError(
                f"layout {self}: pp={self.pp} exceeds n_layers={model.n_layers}; "
                "every pipeline stage needs at least one layer"
            )
        if self.pp > 1 and model.tie_embeddings:
            raise ValueError(
                f"layout {self}: the model ties its LM head to its embedding (tie_word_embeddings), which "
                "needs both in one pipeline stage; use pp=1 (dp, fsdp and tp all work)"
            )
        need = self.data_parallel * self.microbatches
        if global_batch < need:
            raise ValueError(
                f"layout {self}: global_batch={global_batch} is smaller than dp*fsdp*microbatches="
                f"{self.dp}*{self.fsdp}*{self.microbatches}={need}; every micro-batch needs a sample. "
                "Raise the global batch or lower the degrees"
            )
        if self.pp > 1 and global_batch % need:
            raise ValueError(
                f"layout {self}: with pipeline parallelism global_batch={global_batch} must be divisible by "
                f"dp*fsdp*microbatches={need} ({global_batch} % {need} = {global_batch % need}) so that "
                "every micro-batch has the same shape"
            )

    def is_valid(self, model: ModelConfig, global_batch: int) -> bool:
        try:
            self.validate(model, global_batch)
        except ValueError:
            return False
        return True


def enumerate_layouts(world: int, model: ModelConfig, global_batch: int,
                      microbatch_choices: Iterable[int] = (1,)) -> list[Layout]:
    """Every valid layout with exactly ``world`` ranks (pp layouts get microbatches = 2*pp)."""
    found = []
    for dp, fsdp, tp, pp in itertools.product(_divisors(world), repeat=4):
        if dp * fsdp * tp * pp != world:
            continue
        choices = [2 * pp, pp] if pp > 1 else list(microbatch_choices)
        for mb in choices:
            layout = Layout(dp, fsdp, tp, pp, mb)
            if layout.is_valid(model, global_batch):
                found.append(layout)
                break
    return sorted(set(found))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Placement:
    """A layout whose ranks are filled by the given stable worker ids (rank r -> workers[r])."""

    layout: Layout
    workers: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.workers) != self.layout.world:
            raise ValueError(
                f"placement of layout {self.layout} needs {self.layout.world} workers, got {len(self.workers)}"
            )
        if len(set(self.workers)) != len(self.workers):
            raise ValueError(f"placement lists a worker twice: {self.workers}")

    def __str__(self) -> str:
        return f"{self.layout} on workers {list(self.workers)}"

    def rank_of(self, worker: int) -> int | None:
        try:
            return self.workers.index(worker)
        except ValueError:
            return None

    def box(self, spec: TensorSpec, rank: int, n_layers: int) -> Box | None:
        """The slice of ``spec`` that ``rank`` holds, or None if its stage does not own it."""
        layout = self.layout
        c = layout.coord(rank)
        if layout.stage_of(spec, n_layers) != c.pp:
            return None
        box = list(full_box(spec.shape))
        if spec.tp_dim is not None and layout.tp > 1:
            n = spec.shape[spec.tp_dim]
            lo, hi = chunk(n, layout.tp, c.tp)
            box[spec.tp_dim] = (lo, hi)
        if layout.fsdp > 1:
            lo0, hi0 = box[0]
            lo, hi = chunk(hi0 - lo0, layout.fsdp, c.fsdp)
            box[0] = (lo0 + lo, lo0 + hi)
        return tuple(box)

    def holders(self, spec: TensorSpec, n_layers: int) -> Iterator[tuple[int, Box]]:
        """(worker, box) for every worker that holds part of ``spec``."""
        for rank, worker in enumerate(self.workers):
            box = self.box(spec, rank, n_layers)
            if box is not None:
                yield worker, box


# ---- fast helpers for planning at cluster scale -------------------------------------------
# ``Placement.box`` answers one (spec, rank) question at a time. A planner for thousands of ranks
# and thousands of tensors asks the same question millions of times, although the answer depends
# only on the spec's shape and tp_dim and on the rank's (fsdp, tp) coordinate. These helpers give
# every distinct box once; tests check that they agree with ``Placement.box``.

def splits_tp(layout: Layout, tp_dim: int | None) -> bool:
    """Whether ``layout`` cuts a tensor with this ``tp_dim`` across tp ranks (else tp ranks are replicas)."""
    return tp_dim is not None and layout.tp > 1


def box_grid(layout: Layout, shape: tuple[int, ...], tp_dim: int | None) -> tuple[Box, ...]:
    """Every box a stage that owns the tensor holds, indexed by ``grid_index``: fsdp-major, then tp.

    When the layout does not split ``tp_dim`` there is one box per fsdp index, shared by all tp ranks.
    Trailing boxes may be empty (torch.chunk semantics), exactly as ``Placement.box`` gives them.
    """
    split = splits_tp(layout, tp_dim)
    boxes = []
    for f in range(layout.fsdp):
        for t in range(layout.tp if split else 1):
            box = list(full_box(shape))
            if split:
                box[tp_dim] = chunk(shape[tp_dim], layout.tp, t)  # type: ignore[index]
            if layout.fsdp > 1:
                lo0, hi0 = box[0]
                lo, hi = chunk(hi0 - lo0, layout.fsdp, f)
                box[0] = (lo0 + lo, lo0 + hi)
            boxes.append(tuple(box))
    return tuple(boxes)


def grid_index(layout: Layout, coord: Coord, tp_dim: int | None) -> int:
    """Which entry of ``box_grid`` the rank at ``coord`` holds (when its stage owns the tensor)."""
    return coord.fsdp * layout.tp + coord.tp if splits_tp(layout, tp_dim) else coord.fsdp


def stage_table(layout: Layout, n_layers: int) -> tuple[int, ...]:
    """The pipeline stage of every layer, ``stage_table(l, n)[layer] == l.stage_of(<that layer's spec>, n)``."""
    return tuple(stage for stage in range(layout.pp) for _ in layout.stage_layers(stage, n_layers))


def _overlapping(los: list[int], ivs: list[Interval], lo: int, hi: int) -> list[int]:
    """Indices of the sorted, disjoint intervals ``ivs`` that overlap [lo, hi): a bisect, then a short walk."""
    i = max(bisect.bisect_right(los, lo) - 1, 0)
    out = []
    while i < len(ivs) and ivs[i][0] < hi:
        if ivs[i][1] > lo:
            out.append(i)
        i += 1
    return out


def grid_overlaps(old: Layout, new: Layout, shape: tuple[int, ...],
                  tp_dim: int | None) -> list[tuple[int, int, int, Box]]:
    """(new grid index, old grid index, numel, intersection) for every nonempty overlap of a ``box_grid(new)``
    box with a ``box_grid(old)`` box, new-index-major. The pieces of one new box tile it exactly once.

    Boxes vary only in dim 0 (fsdp, and tp when tp_dim == 0) and in tp_dim. Within each such dim the
    old intervals are disjoint, and the old boxes form a grid over them, so a bisect per dim finds the
    overlapping old boxes without trying every pair.
    """
    old_boxes = box_grid(old, shape, tp_dim)
    dims = sorted({0} | ({tp_dim} if tp_dim is not None else set())) if shape else []
    index = {tuple(b[d] for d in dims): i for i, b in enumerate(old_boxes) if box_numel(b) > 0}
    per_dim = []
    for k in range(len(dims)):
        ivs = sorted({key[k] for key in index})
        per_dim.append(([lo for lo, _ in ivs], ivs))
    out = []
    for n, box in enumerate(box_grid(new, shape, tp_dim)):
        if box_numel(box) == 0:
            continue
        candidates = [[ivs[i] for i in _overlapping(los, ivs, *box[d])]
                      for d, (los, ivs) in zip(dims, per_dim, strict=True)]
        for key in itertools.product(*candidates):
            o = index.get(key)
            piece = None if o is None else intersect(box, old_boxes[o])
            if piece is not None:
                out.append((n, o, box_numel(piece), piece))
    return out
