"""Predict a layout's peak memory per worker, calibrate it from the peaks workers report, and fit it to a budget.

Peak bytes above a worker's idle process (torch and Ray loaded, no model), on the busiest rank of a layout: the
state it holds, plus what the step holds at its worst moment. The state:

- **weights**, **frozen** (LoRA's base) and **moments** (two AdamW moments per trainable element): the rank's
  boxes, at ``train.dtype``'s itemsize, except LoRA's frozen matmul weights under mixed precision, which the
  engine stores in bf16 (``model/specs.stored_in_bf16``): 2 bytes, and so gathered in bf16 too.

On top of it, the largest of five moments of a step, each the sum of the terms below as they stand then (each
term was found in, and is checked against, ``bench/memory.py``'s per-phase peaks and its count of what autograd
keeps, on the 494M Qwen2 shape; ``bench/out/memory.txt``):

1. *forward: the root's gather* (fsdp > 1). FSDP2 all-gathers a unit into one flat buffer and copies it out into
   unsharded parameters, a new allocation beside the rank's own shard (not in place of it): two unsharded copies
   until the buffer goes. In the forward the root's buffer lives until the first layer's copy-out (FSDP2's
   implicit prefetch), so **gather** = 2 x the root (the tensors outside the decoder layers: embedding, final
   norm, LM head) + 2 x the largest layer.
2. *backward begins: the root's gather*. The root was resharded after the forward and is gathered again (2 x the
   root), and so is the last layer (2 x the largest layer), while all the forward kept for the backward is alive:
   **activations**, **logits**, and **casts**: under
   mixed precision, the bf16 copies of matmul weights that autograd keeps until each weight's backward. The
   model's linears (``model/cast_linear.py``) keep none: they save the float32 parameter, whose storage FSDP
   frees after the forward and gathers again for the backward, and cast it again there. Copies are kept where
   they fall back to autocast's ``F.linear``: tensor-parallel (DTensor) layer weights, and the head a pipeline's
   last stage gathers for its logits. A weight stored in bf16 (the frozen base's linears) is never copied. With
   activation checkpointing, one layer's copies at a time (its recompute) and the head's. Without mixed
   precision the matmuls save the parameters themselves: no copies.
3. *backward: the head's gradient* (when the head trains). The root gathered (its buffer gone), the casts,
   activations and logits, and **grads**: the head's weight gradient in the compute dtype and again in
   ``train.dtype`` (autocast's cast backward), each the whole [vocab, dim].
4. *backward: the layers'*, at the first layer (full fine-tuning's peak under vocab-parallel). **grads**: every
   gradient shard (the head's since its backward) and, with fsdp > 1, the running layer's unsharded gradients
   before their reduce-scatter; **gather**: its unsharded parameters and the next layer's prefetched all-gather
   buffer. (FSDP2 would keep each reduce-scatter's input until the next one's; ``parallel/fsdp.py`` frees it.)
5. *backward ends*. **grads**: the rank's gradient shards (whole under dp), and with fsdp > 1 the root's
   unsharded gradients and parameters until its reduce-scatter; a trained tied embedding adds the lookup's dense
   gradient, summed into the head's (not vocabulary-parallel, where both write one buffer).

Vocabulary-parallel (``train.vocab_parallel``, fsdp > 1; ``runtime/parallel/vocab.py``): the embedding and an untied
LM head are not in the root; they stay in the rank's rows, so autocast's copy of the head, its gradient and a
trained tied embedding's lookup gradient are the rank's rows too, and **logits** are every fsdp rank's positions
over this rank's rows (one chunk at most) plus the gathered final hidden states and their gradient. Under a
pipeline the head is gathered for its logits (counted as the root's).

The other terms: **activations** for the micro-batch: rows in flight x seq_len x layers of the stage x bytes a
decoder layer keeps per token (what its backward reads: the residual and normed inputs, q/k/v before and after
RoPE, the attention output, the four SwiGLU products; the q/k/v and SwiGLU widths split by tp). Rows in flight:
one micro-batch, or, under a pipeline, the chunks its schedule holds (1F1B: pp, GPipe: all). With
``train.activation_checkpointing`` only each layer's input is kept plus one layer's full set. **logits** (last
stage): micro-batch rows x seq_len positions, at most one chunk of ``model/loss.py``'s (the loss holds one chunk
at a time), x vocab x (itemsize + 4 bytes): the logits and the float32 log-softmax cross-entropy keeps (the LM
head stays whole under tp). Activations, logits and casts are at the compute dtype's itemsize (bf16 under
``train.mixed_precision``), the rest at ``train.dtype``'s. **heap**: glibc serves allocations under its mmap
threshold (``runtime.malloc_mmap_threshold``, 1 MiB by default, fixed by ``runtime/heap.py``; with 0, glibc's
dynamic one, at most ``MMAP_MAX``, 32 MiB) from a heap that keeps freed memory for the next step, so a worker's
RSS never falls below the heap's high-water mark: the layers' copies, two layers' unsharded parameters (the
one running and the one prefetched) and one layer's gradients before and after the cast, each counted when
its tensors are under the threshold; at each moment, less what is live in the heap then (the copies, or the
layers' gradient shards). Larger tensors (a 152k x 896 embedding) are mmapped and returned when freed.
**overhead**: a constant learned from the workers' reports (0 until one arrives).

The measurements behind each term, before and after each change, are in docs/design.md (items 12, 41, 42).

Not counted, each at most one layer's worth: a layer's bf16 weight gradients before their cast; LoRA's first
layer's q/k/v copies are counted though their input (the frozen embedding's output) needs no gradient. Layouts
with fsdp = 1 gather nothing (FSDP2 over one-rank shard groups; not measured). The optimizer's update runs in a
later call (the commit), with the gradient shards and AdamW's temporaries. The root's own tensors are taken as
mmapped (no heap term).

A reshard into the layout holds the old and the new state at once plus one round's buffers
(``runtime.reshard_round_bytes``); the layout's peak is the larger of a step's and a reshard's. It moves the
state at ``train.dtype``: frozen weights stored in bf16 are staged in float32, and read from the old engine as
float32 copies (``Engine.local_tensors``), so they count three times their stored bytes.

Calibration (``observe``): each step's summary carries the largest peak RSS above idle that a worker of the
placement reported. The model keeps the largest per layout and fits ``measured = static + scale *
(activations + logits) + overhead`` (static: everything else at the peak moment), like ``CostModel.observe_step`` does
for time. One layout cannot tell a per-token error from a constant one: ``scale`` stays at 1 (only lowered
when the activations alone overshoot) and the rest becomes ``overhead``; once two layouts with different
activations have run, both are fitted by least squares. Neither depends on the layout.

What a worker may use, and the reshard rounds that fit it, are ``plan/memory_budgets.py``'s. Pure Python, no
torch, no processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from elastic.core.boxes import box_numel
from elastic.core.config import Config
from elastic.core.layout import Coord, Layout, Placement, TensorSpec
from elastic.model.loss import chunk_positions
from elastic.model.specs import EMBED, itemsize, param_specs, storage_itemsize

GB = 1e9
SCALE_BOUNDS = (0.25, 8.0)  # the fitted activation factor stays in these bounds (a bad fit cannot zero it)
STEP_TERMS = ("weights", "frozen", "moments", "grads", "gather", "casts", "activations", "logits", "heap", "overhead")
MMAP_MAX = 32 * 2**20  # glibc's largest mmap threshold (64-bit): smaller allocations may come from its heap


@dataclass(frozen=True)
class MemoryEstimate:
    """A layout's predicted peak bytes per worker, by term, on its busiest rank, and the step's moment it is at."""

    layout: Layout
    terms: dict[str, int]  # STEP_TERMS at the step's peak moment, plus "reshard" (the staged copy and one round)
    step_bytes: int
    reshard_bytes: int
    moment: str = ""  # when in the step the peak falls (a name of ``MemoryModel._moments``)

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
        # What glibc's heap may serve (and keep): under the workers' fixed threshold, else its dynamic one's cap.
        self.mmap_threshold = getattr(self.cfg.runtime, "malloc_mmap_threshold", 0) or MMAP_MAX
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

    def activations(self, layout: Layout) -> tuple[int, int]:
        """(activations, logits) bytes of the layout's stage that keeps the most, calibrated: what a step keeps
        for its backward whichever moment its peak falls at (the floor ``bench/load.py`` measures against)."""
        acts, logits = max((self._activations(layout, stage) for stage in range(layout.pp)), key=sum)
        return int(self.scale * acts), int(self.scale * logits)

    def _stage(self, layout: Layout, stage: int) -> MemoryEstimate:
        moments = self._moments(layout, stage)
        for terms in moments.values():
            terms["activations"] = int(self.scale * terms["activations"])
            terms["logits"] = int(self.scale * terms["logits"])
            terms["overhead"] = int(self.overhead)
        moment, terms = max(moments.items(), key=lambda kv: sum(kv[1][k] for k in STEP_TERMS))
        state = terms["weights"] + terms["frozen"] + terms["moments"]
        # The staged copy, and the least a reshard needs in flight: one message (``round_bound`` gives the
        # rounds the headroom allows, up to runtime.reshard_round_bytes). A reshard moves the state at
        # train.dtype: the frozen weights stored in bf16 are staged at it, and read out of the old engine as
        # copies at it (``Engine.local_tensors``).
        compact = self._sizes(layout, stage)["compact"]  # bytes stored at 2 bytes an element
        widened = compact * self.itemsize // 2  # the same elements at train.dtype
        staged = state - compact + widened
        terms["reshard"] = staged + widened + min(self.cfg.runtime.reshard_chunk_bytes, staged)
        step = sum(terms[k] for k in STEP_TERMS)
        return MemoryEstimate(layout, terms, step, state + terms["reshard"] + terms["overhead"], moment)

    def _moments(self, layout: Layout, stage: int) -> dict[str, dict[str, int]]:
        """The step's candidate peaks (see the module docstring), each as STEP_TERMS before calibration."""
        z = self._sizes(layout, stage)
        sharded = layout.fsdp > 1
        acts, logits = self._activations(layout, stage)
        state = {"weights": z["trainable"], "frozen": z["frozen"], "moments": 2 * z["trainable"]}

        def at(grads: int = 0, gather: int = 0, casts: int = 0, transient: bool = False, heap: float = 0):
            return {**state, "grads": grads, "gather": gather, "casts": casts, "heap": max(0, int(heap)),
                    "activations": acts if transient else 0, "logits": logits if transient else 0}

        mixed = self.compute_itemsize != self.itemsize
        casts = z["casts"] * self.compute_itemsize if mixed else 0
        # The head's weight gradient at the compute dtype and again at train.dtype (autocast's cast backward);
        # vocabulary-parallel, written a block of rows at a time into one train.dtype tensor.
        head_grads = z["head_trainable"] * (self.itemsize + mixed * self.compute_itemsize * (not z["head_rows"]))
        root = z["root"] if sharded else 0
        # glibc's heap keeps its high-water mark: the layers' copies, two layers' unsharded parameters (the one
        # running and the one prefetched) and one layer's gradients before and after the cast, when under the mmap
        # threshold.
        heap = (z["small_casts"] * self.compute_itemsize * mixed + 2 * z["small_layer"] * sharded
                + z["small_layer_grads"] * (1 + mixed * self.compute_itemsize / self.itemsize))
        live_casts = z["small_casts"] * self.compute_itemsize * mixed
        return {
            "forward: the root's gather": at(gather=2 * root + 2 * z["layer"] * sharded,
                                             heap=heap - z["small_layer"] * sharded),
            # The backward gathers the last layer (buffer and copy) as it begins, beside the root.
            "backward begins: the root's gather": at(gather=2 * root + 2 * z["layer"] * sharded, casts=casts,
                                                     transient=True,
                                                     heap=heap - live_casts - z["small_layer"] * sharded),
            "backward: the head's gradient": at(grads=head_grads, gather=root, casts=casts, transient=True,
                                                heap=heap - live_casts),
            # The layers' backward, at the first: every gradient shard, the layer's unsharded gradients and
            # parameters, and the next layer's prefetched all-gather buffer.
            "backward: the layers'": at(grads=z["grads"] + sharded * z["layer_grads"], gather=2 * z["layer"] * sharded,
                                        heap=heap - z["small_layer"] * sharded - z["layer_grad_shards"]),
            "backward ends": at(grads=z["grads"] + sharded * z["root_trainable"] + z["tied_fresh"], gather=root,
                                heap=heap - z["layer_grad_shards"]),
        }

    def _sizes(self, layout: Layout, stage: int) -> dict[str, int]:
        """Bytes of the stage's rank 0. Held: ``trainable``, ``frozen`` (of which ``compact``: stored in bf16 below
        ``train.dtype``), ``grads`` (its gradient shards). Per tp rank, unsharded: ``root`` (tensors outside the
        decoder layers: FSDP's root unit), ``root_trainable``, ``layer`` (the largest layer), ``layer_grads`` (its
        trainable part), ``tied_fresh`` (a trained tied embedding that FSDP gathers: the lookup's dense gradient,
        added to the head's). Elements: ``head_trainable`` (the LM head's, when it trains), ``casts`` (every matmul
        weight of the stage, layers and head; with checkpointing, one layer's and the head's)."""
        n_layers, cfg = self.cfg.model.n_layers, self.cfg.model
        placement = Placement(layout, tuple(range(layout.world)))
        rank = layout.rank(Coord(pp=stage, dp=0, fsdp=0, tp=0))
        last = stage == layout.pp - 1
        vocab_sharded = self._vocab_sharded(layout)
        z = dict.fromkeys(("trainable", "frozen", "compact", "grads", "root", "root_trainable", "tied_fresh",
                           "head_rows", "head_trainable", "head_casts", "layer_grad_shards"), 0)
        # layer -> [unsharded bytes, matmul elements, and of those under the mmap threshold: unsharded bytes, matmul
        # elements, trainable elements; unsharded trainable bytes]
        layers: dict[int, list[int]] = {}
        for spec in self.specs:
            box = placement.box(spec, rank, n_layers)
            if box is None:
                continue
            stored = storage_itemsize(self.cfg, spec)  # a frozen matmul weight under mixed precision: bf16
            nbytes = box_numel(box) * stored
            z["trainable" if spec.trainable else "frozen"] += nbytes
            z["compact"] += nbytes * (stored != self.itemsize)
            z["grads"] += nbytes * spec.trainable
            whole = nbytes * layout.fsdp  # FSDP splits dim 0 of the tp shard evenly, up to rounding
            head = last and (spec.name == "lm_head.weight" or (spec.name == EMBED and cfg.tie_embeddings))
            matmul = self._copied_in_autocast(spec, layout, head, stored, bool(vocab_sharded))
            if spec.owner == "layer":
                small, elements = whole < self.mmap_threshold, whole // stored
                entry = layers.setdefault(spec.layer, [0] * 6)
                for i, v in enumerate((whole, elements * matmul, whole * small,
                                       elements * matmul * (elements * self.compute_itemsize < self.mmap_threshold),
                                       elements * small * spec.trainable, whole * spec.trainable)):
                    entry[i] += v
                z["layer_grad_shards"] += nbytes * spec.trainable
                continue
            # A vocabulary-sharded weight (runtime/parallel/vocab.py) is never whole: its lookup's gradient, its
            # gradient as the head and autocast's copy of it are the rank's rows.
            sharded_rows = spec.name in vocab_sharded
            z["root"] += 0 if sharded_rows else whole
            z["root_trainable"] += 0 if sharded_rows else whole * spec.trainable
            unsharded = nbytes if sharded_rows else whole
            # Vocabulary-parallel, the head's and the lookup's gradients of a tied embedding share one buffer.
            tied = spec.trainable and spec.name == EMBED and cfg.tie_embeddings
            z["tied_fresh"] += whole * (tied and not sharded_rows)
            z["head_trainable"] += unsharded // stored * (spec.trainable and head)
            z["head_rows"] |= head and sharded_rows  # its matmul casts a block of rows at a time, keeps none
            z["head_casts"] += 0 if sharded_rows else whole // stored * matmul
        largest = max(layers.values(), default=[0] * 6)
        z["layer"], z["small_layer"], z["small_layer_grads"] = largest[0], largest[2], largest[4] * self.itemsize
        z["layer_grads"] = largest[5]  # the layer's unsharded gradients (at train.dtype, as its parameters)
        kept, small = [v[1] for v in layers.values()], [v[3] for v in layers.values()]
        if self.cfg.train.activation_checkpointing:  # the recompute casts one layer at a time, in backward
            kept, small = [max(kept, default=0)], [max(small, default=0)]
        z["casts"], z["small_casts"] = sum(kept) + z.pop("head_casts"), sum(small)
        return z

    def _copied_in_autocast(self, spec, layout: Layout, head: bool, stored: int, vocab_sharded: bool) -> bool:
        """Whether autograd keeps a compute-dtype copy of this matmul weight from the forward to its backward: only
        where ``model/cast_linear`` falls back to autocast's ``F.linear`` (a tensor-parallel DTensor layer weight,
        and the head a pipeline's last stage gathers for its logits), and not if it is stored at the compute dtype
        already. Elsewhere autograd saves the parameter itself, which FSDP frees after the forward and gathers
        again."""
        copied = layout.tp > 1 if spec.owner == "layer" else (head and layout.pp > 1 and vocab_sharded)
        return (len(spec.shape) == 2 and (spec.name != EMBED or head) and stored != self.compute_itemsize
                and copied)

    def _vocab_sharded(self, layout: Layout) -> set[str]:
        """The tensors the engine keeps in their fsdp shards of vocabulary rows (``runtime/parallel/vocab.py``): the
        embedding, and an untied LM head that LoRA does not adapt, unless a pipeline's schedule needs its logits
        (then the head is gathered for its matmul, counted here as the root's gather)."""
        if layout.fsdp == 1 or not getattr(self.cfg.train, "vocab_parallel", False):
            return set()
        adapted = any(s.name.startswith("lm_head.lora_") for s in self.specs)
        return {EMBED} | (set() if layout.pp > 1 or adapted else {"lm_head.weight"})

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
        if stage != layout.pp - 1:
            return acts * self.compute_itemsize, 0
        # The loss holds one chunk of positions' logits at a time once the whole would pass model/loss's bound.
        positions, vocab, gathered = micro * seq, m.vocab_size, 0
        if layout.pp == 1 and self._vocab_sharded(layout):
            # Vocabulary-parallel: every fsdp rank's positions over this rank's rows, plus the gathered final
            # hidden states and their gradient (runtime/parallel/vocab.py).
            positions, vocab = positions * layout.fsdp, math.ceil(vocab / layout.fsdp)
            gathered = 2 * positions * m.dim * self.itemsize
        logits = min(positions, chunk_positions(vocab)) * vocab * (self.compute_itemsize + 4) + gathered
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
        """(everything but activations and logits; activations and logits, before calibration) of the stage's
        uncalibrated peak moment."""
        terms = max(self._moments(layout, stage).values(), key=lambda t: sum(t.values()))
        transient = terms.pop("activations") + terms.pop("logits")
        return sum(terms.values()), transient

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
