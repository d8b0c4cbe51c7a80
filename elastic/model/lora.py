"""LoRA: low-rank adapters on the decoder's linear layers, with PEFT's names, scaling and init.

``apply_lora`` swaps target ``nn.Linear`` modules for ``LoRALinear`` in place and freezes every
other parameter. A ``LoRALinear`` keeps the frozen base weight under the name ``weight`` and adds
``lora_A`` ([r, in]) and ``lora_B`` ([out, r]), so parameter names are the base model's plus
``...q_proj.lora_A.weight`` / ``...q_proj.lora_B.weight``: the names PEFT uses below its
``base_model.model.`` prefix (see ``peft_io``).

Adapters are part of the training state, so ``lora_tensor_specs`` describes them like
``tensor_specs`` describes the base: global shapes plus the tensor-parallel rule that follows
from the base layer (column-parallel base: A replicated, B split on its output; row-parallel base:
A split on its input, B replicated), so that ``x @ A.T @ B.T`` needs no extra communication
beyond the base layer's own. ``init_lora_tensor`` draws each adapter from its own seeded
generator, so any rank can rebuild exactly the slice it holds.

Dropout (``lora.dropout``) keeps no RNG state either. A training forward names its rows
(``dropout_rows``: the run's seed, the optimizer step and each row's global sample index), and each
adapter draws its mask for a row from a generator seeded by (seed, step, sample, module name): a
[tokens, in_features] keep-mask, the whole row's, so the mask of a sample does not depend on its
batch-mates, on the layout or on which rank computes it, and a replay after a reshard or a recovery
draws it again. A forward that names no rows (evaluation, sampling, log-prob passes) has no dropout,
nor has one in eval mode. Under tensor parallelism the adapter's input may be split on its features
(row-parallel base): the full mask is drawn and ``mask_hook`` (set by ``runtime/parallel/tensor.py``)
places it like the input, so each rank keeps exactly its slice.

No distributed code: the forward uses ``cast_linear`` (``F.linear`` without autocast's kept weight copy) and
module calls only, so it runs unchanged when the weights are DTensors placed by the parallel layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from elastic.core.config import DEFAULT_LORA_TARGETS as DEFAULT_TARGETS  # noqa: F401 (re-exported)
from elastic.core.config import LoraConfig, ModelConfig  # noqa: F401 (LoraConfig re-exported)
from elastic.core.layout import TensorSpec
from elastic.core.seeds import stable_seed
from elastic.model.cast_linear import CastLinear, cast_linear
from elastic.model.llama import TP_DIM, TP_PLAN, tensor_specs


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def matches_target(module_name: str, targets: tuple[str, ...]) -> bool:
    """PEFT's rule for a list of target names: the module name equals a target or ends with '.' + target."""
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


@dataclass(frozen=True)
class DropoutRows:
    """The rows of one training forward, for LoRA dropout: ``samples[i]`` is row i's global sample index."""

    seed: int
    step: int
    samples: tuple[int, ...]

    def mask(self, module: str, row_shape: Sequence[int], p: float, dtype: torch.dtype) -> torch.Tensor:
        """The scaled keep-mask [rows, *row_shape] of adapter ``module``: 1 / (1 - p) where kept, else 0.

        Row i's mask is ``torch.rand(row_shape) >= p`` (float32) from a generator seeded by
        ``stable_seed(seed, "lora_dropout", step, samples[i], module)``.
        """
        keep = torch.stack([
            torch.rand(tuple(row_shape), generator=torch.Generator().manual_seed(
                stable_seed(self.seed, "lora_dropout", self.step, sample, module)), dtype=torch.float32) >= p
            for sample in self.samples])
        return keep.to(dtype) / (1 - p)


_ROWS: contextvars.ContextVar[DropoutRows | None] = contextvars.ContextVar("lora_dropout_rows", default=None)


@contextlib.contextmanager
def dropout_rows(seed: int, step: int, samples: Sequence[int]) -> Iterator[None]:
    """Within the block, LoRA forwards in training mode apply dropout to rows ``samples`` of step ``step``."""
    token = _ROWS.set(DropoutRows(seed, step, tuple(int(s) for s in samples)))
    try:
        yield
    finally:
        _ROWS.reset(token)


class _Linear(CastLinear):
    """``CastLinear`` that skips its random init on the meta device, where there are no values to fill
    (engines are built on meta, once per reshard; the init's Python is a tenth of a LoRA rebuild)."""

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            super().reset_parameters()


class LoRALinear(_Linear):
    """``nn.Linear`` plus a low-rank update: y = x W^T (+ b) + scaling * B(A(dropout(x))).

    The base ``weight`` (and ``bias``) stay frozen; only ``lora_A.weight`` and ``lora_B.weight``
    train. ``merge()`` folds the update into ``weight`` for inference or export and sets
    ``merged``; ``unmerge()`` takes it out again (exact up to float rounding). ``name`` is the
    module's name in the model (``apply_lora`` sets it): it seeds the dropout masks.
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, bias: bool = False, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = dropout
        self.name = ""
        # Places the full dropout mask like the input (a DTensor under tp); None: the input is a plain tensor.
        self.mask_hook: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self.lora_A = _Linear(in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = _Linear(r, out_features, bias=False, device=device, dtype=dtype)
        self.merged = False
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        if self.weight.device.type != "meta":
            self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, base: nn.Linear, cfg: LoraConfig) -> LoRALinear:
        """A LoRALinear that reuses ``base``'s weight (and bias) Parameter objects: no copy, works on meta."""
        device, dtype = base.weight.device, base.weight.dtype
        # Build the throwaway base weight on meta (no allocation), then adopt base's parameters.
        new = cls(base.in_features, base.out_features, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora,
                  bias=base.bias is not None, device="meta", dtype=dtype)
        new.weight = base.weight
        new.bias = base.bias
        new.lora_A.to_empty(device=device)
        new.lora_B.to_empty(device=device)
        new.train(base.training)
        new.weight.requires_grad_(False)
        if new.bias is not None:
            new.bias.requires_grad_(False)
        if device.type != "meta":
            new.reset_lora_parameters()
        return new

    def reset_lora_parameters(self) -> None:
        """PEFT's default init from the global RNG: A as nn.Linear's reset (kaiming-uniform a=sqrt(5)), B zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = cast_linear(x, self.weight, self.bias)
        if self.merged:
            return out
        return out + self.scaling * self.lora_B(self.lora_A(self._dropout(x)))

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        rows = _ROWS.get()
        # Meta inputs carry no values (shape passes); only a named training forward drops anything.
        if self.dropout == 0 or rows is None or not self.training or x.device.type == "meta":
            return x
        if len(rows.samples) != x.shape[0]:
            raise RuntimeError(f"{self.name}: LoRA dropout was given {len(rows.samples)} sample indices for a "
                               f"batch of {x.shape[0]} rows")
        mask = rows.mask(self.name, x.shape[1:], self.dropout, x.dtype)  # x.shape is global for a DTensor
        return x * (mask if self.mask_hook is None else self.mask_hook(mask, x))

    def delta_weight(self) -> torch.Tensor:
        """The update scaling * B @ A, shaped like ``weight`` ([out, in])."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight``; the forward then skips the adapter path. No-op if merged."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter back out of ``weight``. No-op if not merged."""
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, dropout={self.dropout}, "
                f"rslora={self.use_rslora}, merged={self.merged}")


def apply_lora(model: nn.Module, cfg: LoraConfig, seed: int | None = None) -> nn.Module:
    """Replace every target ``nn.Linear`` of ``model`` by a ``LoRALinear`` in place, freeze the rest.

    The base weights are kept (same Parameter objects, same names), so this works on a model built
    on the meta device; its adapters are then on meta too and the caller materialises them (e.g.
    from ``init_lora_tensor``). On a real device the adapters get PEFT's init from the global RNG,
    or, with ``seed``, the deterministic ``init_lora_tensor`` values of the full tensors.
    Returns ``model``.
    """
    linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and name}
    already = [name for name, mod in linears.items() if isinstance(mod, LoRALinear)]
    _require(not already, f"the model already has LoRA layers ({already[:3]}...); apply_lora once per model")
    # Adapters' own lora_A/lora_B are linears too, but none exist yet (checked above).
    for target in cfg.targets:
        if not any(matches_target(name, (target,)) for name in linears):
            leaf_names = sorted({name.rsplit(".", 1)[-1] for name in linears})
            raise ValueError(
                f"lora target {target!r} names no nn.Linear in the model; linear layers are named {leaf_names} "
                "(match by name suffix, e.g. 'q_proj' or 'self_attn.q_proj')"
            )
    for p in model.parameters():
        p.requires_grad_(False)
    for name, base in linears.items():
        if not matches_target(name, cfg.targets):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lora = LoRALinear.from_linear(base, cfg)
        lora.name = name
        setattr(parent, child, lora)
        if seed is not None and lora.weight.device.type != "meta":
            with torch.no_grad():
                for sub in ("lora_A", "lora_B"):
                    param = getattr(lora, sub).weight
                    spec = TensorSpec(f"{name}.{sub}.weight", tuple(param.shape))
                    param.copy_(init_lora_tensor(spec, cfg, seed, param.dtype))
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    for mod in lora_modules(model).values():
        mod.merge()


def unmerge_lora(model: nn.Module) -> None:
    for mod in lora_modules(model).values():
        mod.unmerge()


def is_lora_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, by our (= PEFT's unprefixed) names."""
    return {name: p.detach() for name, p in model.named_parameters() if is_lora_name(name)}


def init_lora_tensor(spec: TensorSpec, lora_cfg: LoraConfig, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The full initial value of one adapter tensor, the same on every rank and layout.

    A (``...lora_A.weight``, [r, in]) is uniform(-1/sqrt(in), 1/sqrt(in)), which is what
    kaiming-uniform with a=sqrt(5) gives (PEFT's default); B (``...lora_B.weight``) is zero, so a
    fresh adapter leaves the model unchanged. Drawn in float32 whatever ``dtype``.
    """
    if spec.name.endswith("lora_B.weight"):
        return torch.zeros(spec.shape, dtype=dtype)
    _require(spec.name.endswith("lora_A.weight"), f"{spec.name!r} is not a LoRA tensor (lora_A/lora_B.weight)")
    bound = 1.0 / math.sqrt(spec.shape[1])
    gen = torch.Generator().manual_seed(stable_seed(seed, "lora", spec.name))
    full = torch.rand(spec.shape, generator=gen, dtype=torch.float32) * (2 * bound) - bound
    return full.to(dtype)


def lora_tensor_specs(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> list[TensorSpec]:
    """Every adapter tensor of the LoRA model with its global shape and sharding rule, in model order.

    Column-parallel base (output split): A [r, in] replicated, B [out, r] split on dim 0, so each
    tp rank computes its own output slice from the replicated input. Row-parallel base (input
    split): A split on dim 1, B replicated; each rank's B(A_local x_local) is a partial sum, and
    since B is linear the base layer's own all-reduce of its partial output also completes the
    adapter path. Bases without a tp style (lm_head) get replicated adapters.
    """
    base = tensor_specs(model_cfg)
    weights = [s for s in base if s.name.endswith(".weight") and len(s.shape) == 2 and "embed_tokens" not in s.name]
    for target in lora_cfg.targets:
        if not any(matches_target(s.name.removesuffix(".weight"), (target,)) for s in weights):
            names = sorted({s.name.removesuffix(".weight").rsplit(".", 1)[-1] for s in weights})
            raise ValueError(f"lora target {target!r} names no linear layer of the Llama model; choose from {names}")
    specs = []
    for s in weights:
        module = s.name.removesuffix(".weight")
        if not matches_target(module, lora_cfg.targets):
            continue
        out_f, in_f = s.shape
        local = module.split(".", 3)[-1] if s.owner == "layer" else module  # "self_attn.q_proj"
        style = TP_PLAN.get(local)
        a_dim = TP_DIM["rowwise"] if style == "rowwise" else None
        b_dim = TP_DIM["colwise"] if style == "colwise" else None
        specs.append(TensorSpec(f"{module}.lora_A.weight", (lora_cfg.r, in_f), a_dim, s.owner, s.layer, True))
        specs.append(TensorSpec(f"{module}.lora_B.weight", (out_f, lora_cfg.r), b_dim, s.owner, s.layer, True))
    return specs


def frozen_base_specs(model_cfg: ModelConfig) -> list[TensorSpec]:
    """The base model's specs with trainable=False: LoRA freezes every base weight, targeted or not."""
    return [dataclasses.replace(s, trainable=False) for s in tensor_specs(model_cfg)]


def lora_model_specs(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> list[TensorSpec]:
    """All parameters of the LoRA model (frozen base + adapters) in ``named_parameters`` order."""
    adapters: dict[str, list[TensorSpec]] = {}
    for spec in lora_tensor_specs(model_cfg, lora_cfg):
        adapters.setdefault(spec.name.rsplit(".", 2)[0] + ".weight", []).append(spec)
    out = []
    for spec in frozen_base_specs(model_cfg):
        out.append(spec)
        out.extend(adapters.get(spec.name, []))
    return out


def merge_state_dict(base_state: dict[str, torch.Tensor], adapter_state: dict[str, torch.Tensor],
                     lora_cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """Full weights with every adapter folded in: W + scaling * B @ A, computed in float64, in W's dtype.

    ``adapter_state`` holds pairs ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` whose base
    ``<module>.weight`` is in ``base_state``; callers validate names and shapes first.
    """
    merged = dict(base_state)
    for name, a in adapter_state.items():
        if not name.endswith(".lora_A.weight"):
            continue
        module = name.removesuffix(".lora_A.weight")
        b = adapter_state[f"{module}.lora_B.weight"]
        w = base_state[f"{module}.weight"]
        delta = lora_cfg.scaling * (b.detach().double() @ a.detach().double())
        merged[f"{module}.weight"] = (w.detach().double() + delta).to(w.dtype)
    return merged
