"""Predict a layout's peak memory per worker, calibrate it from the peaks workers report, and fit it to a budget.

Peak bytes above a worker's idle process (torch and Ray loaded, no model), on the busiest rank of a layout:

- **state**: its boxes of the trainable weights (``weights``), the frozen ones (``frozen``, LoRA's base) and
  the AdamW moments (``moments``, two per trainable element), all at ``train.dtype``'s itemsize;
- **grads**: the trainable boxes once more (FSDP2 keeps sharded gradients; with dp they are whole);
- **gather** (fsdp > 1 only): FSDP2 all-gathers a layer's parameters while it runs, with the next layer's
  prefetched (two layers unsharded at a time), and keeps its root module (the embedding, the final norm
  and the LM head of the stage) unsharded for the whole step; a layer's trainable gradients are unsharded
  until their reduce-scatter. Counted as those unsharded bytes minus the rank's own shards of them;
- **activations** for the micro-batch: rows in flight x seq_len x layers of the stage x bytes a decoder
  layer keeps per token (what its backward reads: the residual and normed inputs, q/k/v before and after
  RoPE, the attention output, the four SwiGLU products; the q/k/v and SwiGLU widths split by tp). Rows in
  flight: one micro-batch, or, under a pipeline, the chunks its schedule holds (1F1B: pp, GPipe: all).
  With ``train.activation_checkpointing`` only each layer's input is kept plus one layer's full set;
- **logits** (last stage): micro-batch rows x seq_len positions, at most one chunk of ``model/loss.py``'s
  (the loss holds one chunk at a time), x vocab x (itemsize + 4 bytes): the logits and the float32
  log-softmax cross-entropy keeps (the LM head stays whole under tp). Activations and logits are at
  the compute dtype's itemsize (bf16 under ``train.mixed_precision``), the state at ``train.dtype``'s;
- **overhead**: a constant learned from the workers' reports (allocator caches, optimizer temporaries).

A step's peak is the sum of these. A reshard into the layout holds the old and the new state at once plus
one round's buffers (``runtime.reshard_round_bytes``); the layout's peak is the larger of the two.

Calibration (``observe``): each step's summary carries the largest peak RSS above idle that a worker of the
placement reported. The model keeps the largest per layout and fits ``measured = static + scale *
(activations + logits) + overhead`` (static: state, grads, gather), like ``CostModel.observe_step`` does
for time. One layout cannot tell a per-token error from a constant one: ``scale`` stays at 1 (only lowered
when the activations alone overshoot) and the rest becomes ``overhead``; once two layouts with different
activations have run, both are fitted by least squares. Neither depends on the layout.

Budgets (``node_budgets``): bytes per worker from what each node has, divided among the job's workers
there, with headroom, less their idle RSS. Pure Python, no torch, no processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from elastic.core.boxes import box_numel
from elastic.core.config import Config
from elastic.core.layout import Coord, Layout, Placement, TensorSpec
from elastic.model.loss import chunk_positions
from elastic.model.specs import itemsize, param_specs

GB = 1e9
HEADROOM = 0.8  # share of a node's memory the workers placed there may use; the rest is the OS, driver, Ray
SCALE_BOUNDS = (0.25, 8.0)  # the fitted activation factor stays in these bounds (a bad fit cannot zero it)
STEP_TERMS = ("weights", "frozen", "moments", "grads", "gather", "activations", "logits", "overhead")


@dataclass(frozen=True)
class MemoryEstimate:
    """A layout's predicted peak bytes per worker, by term, on its busiest rank."""

    layout: Layout
    terms: dict[str, int]  # STEP_TERMS, plus "reshard" (the staged copy and one round, during a move)
    step_bytes: int
    reshard_bytes: int

    @property
    def peak(self) -> int:
        return max(self.step_bytes, self.reshard_bytes)

    def describe(self, top: int = 4) -> str:
        """``"fsdp=2: 1.85 GB per worker (activations 0.90 GB, frozen 0.50 GB, ...)"``, the largest terms of the
        larger of a step and a reshard first."""
        reshard = self.reshard_bytes > self.step_bytes
        names = ("weights", "frozen", "moments", "reshard", "overhead") if reshard else STEP_TERMS
        shown = sorted(((self.terms[k], k) for k in names if self.terms[k] > 0), reverse=True)
        parts = ", ".join(f"{k} {size(v)}" for v, k in shown[:top])
        return f"{self.layout}: {size(self.peak)} per worker{' during a reshard' if reshard else ''} ({parts})"


def size(nbytes: float) -> str:
    """Bytes as GB, or MB below 0.1 GB (a tiny model's terms are not all 0.00 GB)."""
    return f"{nbytes / GB:.2f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 1e6:.2f} MB"


@dataclass
class MemoryModel:
    """Peak memory per worker of a layout (see the module docstring); calibrated by ``observe``."""

    cfg: Config
    scale: float = 1.0  # factor on activations and logits, calibrated
    overhead: float = 0.0  # constant bytes per worker, calibrated
    seen: dict[str, tuple[Layout, int]] = field(default_factory=dict)  # layout -> largest measured peak
    predicted: dict[str, int] = field(default_factory=dict)  # layout -> peak predicted before its first report

    def __post_init__(self) -> None:
        self.specs: tuple[TensorSpec, ...] = tuple(param_specs(self.cfg))
        self.itemsize = itemsize(self.cfg)
        # Activations and logits are kept at the compute dtype: bf16 under train.mixed_precision (read with a
        # default, so this model does not depend on which sections a config carries).
        bf16 = getattr(self.cfg.train, "mixed_precision", "no") == "bf16"
        self.compute_itemsize = 2 if bf16 else self.itemsize
        self._cache: dict[tuple, MemoryEstimate] = {}

    # ---- prediction ------------------------------------------------------------------
    def estimate(self, layout: Layout) -> MemoryEstimate:
        """The layout's peak on its busiest stage (ranks of one stage hold equal shares, up to uneven splits);
        cached until the calibration changes."""
        key = (layout, self.scale, self.overhead)
        if key not in self._cache:
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = max((self._stage(layout, stage) for stage in range(layout.pp)), key=lambda e: e.peak)
        return self._cache[key]

    def peak(self, layout: Layout) -> int:
        return self.estimate(layout).peak

    def _stage(self, layout: Layout, stage: int) -> MemoryEstimate:
        held, whole = self._held(layout, stage)
        terms = {"weights": held["trainable"], "frozen": held["frozen"], "moments": 2 * held["trainable"],
                 "grads": held["trainable"]}
        terms["gather"] = self._gather(layout, held, whole)
        acts, logits = self._activations(layout, stage)
        terms["activations"] = int(self.scale * acts)
        terms["logits"] = int(self.scale * logits)
        terms["overhead"] = int(self.overhead)
        state = terms["weights"] + terms["frozen"] + terms["moments"]
        # The staged copy, and the least a reshard needs in flight: one message (``round_bound`` gives the
        # rounds the headroom allows, up to runtime.reshard_round_bytes).
        terms["reshard"] = state + min(self.cfg.runtime.reshard_chunk_bytes, state)
        step = sum(terms[k] for k in STEP_TERMS)
        return MemoryEstimate(layout, terms, step, state + terms["reshard"] + terms["overhead"])

    def _held(self, layout: Layout, stage: int) -> tuple[dict[str, int], dict[str, int]]:
        """Bytes the stage's rank 0 holds (trainable, frozen), and the stage's unsharded bytes per tp rank
        (``root``: tensors outside the decoder layers; ``layer`` and ``layer_grads``: its largest layer)."""
        n_layers = self.cfg.model.n_layers
        placement = Placement(layout, tuple(range(layout.world)))
        rank = layout.rank(Coord(pp=stage, dp=0, fsdp=0, tp=0))
        held = {"trainable": 0, "frozen": 0, "root": 0, "layer": 0, "layer_grads": 0}
        root, layers, layer_grads = 0, {}, {}
        for spec in self.specs:
            box = placement.box(spec, rank, n_layers)
            if box is None:
                continue
            nbytes = box_numel(box) * self.itemsize
            held["trainable" if spec.trainable else "frozen"] += nbytes
            unsharded = nbytes * layout.fsdp  # FSDP splits dim 0 of the tp shard evenly, up to rounding
            if spec.owner == "layer":
                layers[spec.layer] = layers.get(spec.layer, 0) + unsharded
                layer_grads[spec.layer] = layer_grads.get(spec.layer, 0) + (unsharded if spec.trainable else 0)
            else:
                root += unsharded
                held["root"] += nbytes
        biggest = max(layers, key=layers.get, default=None)
        whole = {"root": root, "layer": layers.get(biggest, 0), "layer_grads": layer_grads.get(biggest, 0)}
        held["layer"] = whole["layer"] // layout.fsdp
        return held, whole

    def _gather(self, layout: Layout, held: dict[str, int], whole: dict[str, int]) -> int:
        if layout.fsdp == 1:
            return 0
        layers = min(2, self._stage_layer_count(layout))
        own = held["root"] + layers * held["layer"]
        return max(0, whole["root"] + layers * whole["layer"] + whole["layer_grads"] - own)

    def _stage_layer_count(self, layout: Layout) -> int:
        return max(len(layout.stage_layers(s, self.cfg.model.n_layers)) for s in range(layout.pp))

    def _activations(self, layout: Layout, stage: int) -> tuple[int, int]:
        """(activation bytes, logit bytes) of the stage's busiest moment, before calibration."""
        m, seq = self.cfg.model, self.cfg.data.seq_len
        rows = math.ceil(self.cfg.train.global_batch / layout.data_parallel)
        micro = math.ceil(rows / layout.microbatches)
        # A pipeline's 1F1B schedule (microbatches >= pp) holds up to pp chunks' activations, GPipe (fewer
        # microbatches than stages) every chunk's: min(pp, microbatches) either way; no pipeline, one micro-batch.
        in_flight = micro * min(layout.pp, layout.microbatches)
        head = m.head_size or m.dim // m.n_heads
        q, kv = m.n_heads * head, m.n_kv_heads * head
        per_token = 6 * m.dim + (2 * q + 2 * q + 3 * kv + 4 * m.ffn_dim) // layout.tp  # elements per layer
        n_layers = len(layout.stage_layers(stage, m.n_layers))
        if self.cfg.train.activation_checkpointing:
            acts = in_flight * seq * m.dim * n_layers + micro * seq * per_token
        else:
            acts = in_flight * seq * per_token * n_layers
        # The loss holds one chunk of positions' logits at a time once the whole would pass model/loss's bound.
        positions = min(micro * seq, chunk_positions(m.vocab_size))
        logits = positions * m.vocab_size * (self.compute_itemsize + 4) if stage == layout.pp - 1 else 0
        return acts * self.compute_itemsize, logits

    # ---- calibration -----------------------------------------------------------------
    def observe(self, layout: Layout, peak_bytes: int) -> None:
        """A step ran on ``layout`` and its busiest worker peaked at ``peak_bytes`` above idle (0: not known)."""
        if peak_bytes <= 0:
            return
        key = str(layout)
        self.predicted.setdefault(key, self.estimate(layout).step_bytes)  # a step's peak is what was measured
        if peak_bytes <= self.seen.get(key, (layout, 0))[1]:
            return
        self.seen[key] = (layout, peak_bytes)
        self._fit()

    def _fit(self) -> None:
        points = []  # (residual after the static terms, uncalibrated activations + logits)
        for layout, measured in self.seen.values():
            static, transient = max((self._raw(layout, stage) for stage in range(layout.pp)), key=sum)
            points.append((measured - static, transient))
        lo, hi = SCALE_BOUNDS
        xs = {x for _, x in points}
        if len(xs) >= 2:
            n = len(points)
            mx, my = sum(x for _, x in points) / n, sum(y for y, _ in points) / n
            var = sum((x - mx) ** 2 for _, x in points)
            slope = sum((x - mx) * (y - my) for y, x in points) / var
            self.scale = min(hi, max(lo, slope))
        else:  # one layout: the activations only shrink when they alone overshoot (see the module docstring)
            y, x = max(points)
            self.scale = min(1.0, max(lo, y / x)) if x > 0 and y < x else 1.0
        self.overhead = max(0.0, max(y - self.scale * x for y, x in points))

    def _raw(self, layout: Layout, stage: int) -> tuple[int, int]:
        """(state, grads and gather; activations and logits before calibration) of one stage."""
        held, whole = self._held(layout, stage)
        static = 4 * held["trainable"] + held["frozen"] + self._gather(layout, held, whole)
        return static, sum(self._activations(layout, stage))

    def report(self) -> list[dict]:
        """Each layout that reported a peak: a step's predicted peak (before it ran, and now) against the measured
        one, in GB, with the terms and the predicted peak of a reshard into it."""
        rows = []
        for key, (layout, peak) in self.seen.items():
            estimate = self.estimate(layout)
            rows.append({"layout": key, "predicted_gb": round(self.predicted[key] / GB, 3),
                         "calibrated_gb": round(estimate.step_bytes / GB, 3), "measured_gb": round(peak / GB, 3),
                         "reshard_gb": round(estimate.reshard_bytes / GB, 3),
                         "terms_gb": {k: round(v / GB, 3) for k, v in estimate.terms.items()}})
        return rows

    def lines(self) -> list[str]:
        """One line per layout that ran: the prediction beside the measured peak (what the CLI prints)."""
        return [f"memory on {r['layout']}: a step's peak predicted {r['predicted_gb']:.3f} GB per worker before it "
                f"ran ({r['calibrated_gb']:.3f} GB calibrated), measured {r['measured_gb']:.3f} GB (peak RSS above "
                f"idle, busiest worker); a reshard into it {r['reshard_gb']:.3f} GB" for r in self.report()]


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
    """Bytes of the state (weights, frozen weights, AdamW moments) ``worker`` holds in ``placement``."""
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
