"""The reference trainer's own pieces, checked by hand: it is the yardstick of every equivalence test, so
it must be right on its own terms (and it must not be the engine)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_config
from tests.reference import (
    lr_factor,
    noisy_rewards,
    our_name,
    step_positions,
    train_reference,
    trl_advantages,
    trl_kl,
    trl_loss,
    user_function,
)

ROOT = Path(__file__).resolve().parents[2]


ALLOWED = {"elastic.core.config", "elastic.core.data", "elastic.model.init", "elastic.model.llama",
           "elastic.model.lora", "elastic.core.seeds", "elastic.core.tokenizer",
           "elastic.recipes.grpo.config", "elastic.recipes.grpo.rewards",
           "elastic.recipes.grpo.prompts"}  # the data: a prompt file's rows and token ids (no padding used)
DYNAMIC_OK = {"user_function"}  # imports a user's reward module by name, and refuses elastic's at run time


def imports_of(source: str) -> tuple[set[str], list[str]]:
    """Every module a source imports, in every form: ``import a.b``, ``from a import b`` (as ``a.b`` when
    that is a module), relative imports, and ``importlib.import_module`` / ``__import__`` calls with a
    literal name; and the functions that import by a name computed at run time (or ``exec``/``eval``)."""
    import importlib.util

    used, dynamic = set(), []

    def imported_from(module: str, names: list[str]) -> None:
        used.add(module)
        for name in names:
            try:
                if importlib.util.find_spec(f"{module}.{name}") is not None:
                    used.add(f"{module}.{name}")
            except (ImportError, ValueError):
                pass  # not a package: ``name`` is an attribute of ``module``

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.Import):
            used.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = "tests" * bool(node.level) + ("." if node.level and node.module else "") + (node.module or "")
            imported_from(module, [a.name for a in node.names])
        elif isinstance(node, ast.Call):
            f = node.func
            called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if called in ("import_module", "__import__", "exec", "eval", "spec_from_file_location"):
                arg = node.args[0] if node.args else None
                if called in ("import_module", "__import__") and isinstance(arg, ast.Constant) \
                        and isinstance(arg.value, str):
                    used.add(arg.value)
                else:
                    dynamic.append(function)
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(source), "<module>")
    return used, dynamic


def test_the_reference_imports_no_training_code_of_ours():
    used, dynamic = imports_of((ROOT / "tests/reference.py").read_text())
    ours = {m for m in used if m.split(".")[0] in ("elastic", "tests")}
    assert ours and ours <= ALLOWED, f"the reference uses {sorted(ours - ALLOWED)}"
    assert set(dynamic) <= DYNAMIC_OK, f"imports by a computed name in {sorted(set(dynamic) - DYNAMIC_OK)}"
    with pytest.raises(ValueError, match="no module of elastic"):
        user_function("elastic.runtime.engine:Engine")


def test_the_import_guard_sees_every_form():
    source = """
import elastic.runtime.engine
import elastic.control.controller as c
from elastic.runtime import optim
from elastic.model.generate import sample
from . import helpers
import importlib
def f(name):
    importlib.import_module("elastic.runtime.transfer")
    __import__("elastic.recipes.grpo.worker")
    importlib.import_module(name)
"""
    used, dynamic = imports_of(source)
    assert {"elastic.runtime.engine", "elastic.control.controller", "elastic.runtime.optim",
            "elastic.model.generate", "tests.helpers", "elastic.runtime.transfer",
            "elastic.recipes.grpo.worker"} <= used
    assert dynamic == ["f"]


def test_warmup_then_cosine_by_hand():
    cfg = tiny_config(steps=10)  # lr 1e-2, warmup 2, min_lr_ratio 0.1
    assert [lr_factor(s, cfg) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, cfg) == pytest.approx(1.0)
    assert lr_factor(6, cfg) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 0.5)) / 2)  # halfway: 0.55
    assert lr_factor(10, cfg) == pytest.approx(0.1) and lr_factor(50, cfg) == pytest.approx(0.1)


def test_step_positions_tile_the_epoch():
    assert list(step_positions(0, 4)) == [0, 1, 2, 3] and list(step_positions(3, 4)) == [12, 13, 14, 15]


def test_peft_names_map_to_ours():
    assert our_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert our_name("base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight") == \
        "model.layers.1.mlp.down_proj.lora_B.weight"
    assert our_name("model.norm.weight") == "model.norm.weight"


def test_trl_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 0.0], dtype=torch.float64)
    centred = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.5, -0.5], dtype=torch.float64)
    assert torch.allclose(trl_advantages(rewards, 4, "none"), centred)
    std1, std2 = 0.5, math.sqrt(1 / 6)  # unbiased std of (1,0,0,0) and of (.5,.5,1,0)
    expected = centred / torch.tensor([std1] * 4 + [std2] * 4, dtype=torch.float64).add(1e-4)
    assert torch.allclose(trl_advantages(rewards, 4, "group"), expected)


def test_trl_loss_by_hand():
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -1.5], [-0.5, -3.5]], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]])
    r = torch.exp(logps - old)  # [[1, e^-0.5], [1, e^0.5]]
    # A = +1: -min(r, clip(r, .8, 1.2)); A = -2: -min(-2r, -2 clip(r)) = 2 max(r, clip(r))
    row0 = [-1.0, -min(r[0, 1].item(), 0.8)]
    row1 = [2.0, 2 * max(r[1, 1].item(), 1.2)]
    per_seq = [(row0[0] + row0[1]) / 2, row1[0] / 1]
    got = trl_loss(logps, old, adv, mask, 0.2, None, "grpo", 4)
    assert float(got) == pytest.approx(sum(per_seq) / 2)
    assert float(trl_loss(logps, old, adv, mask, 0.2, None, "dapo", 4)) == pytest.approx((sum(row0) + row1[0]) / 3)
    assert float(trl_loss(logps, old, adv, mask, 0.2, None, "dr_grpo", 4)) == pytest.approx((sum(row0) + row1[0]) / 8)


def test_trl_kl_penalty_by_hand():
    """TRL adds beta times the k3 estimate exp(ref - logp) - (ref - logp) - 1 to every token's loss before masking."""
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], dtype=torch.float64)
    ref = logps + torch.tensor([[0.0, math.log(2)], [-math.log(2), 1.0]], dtype=torch.float64)
    kl = trl_kl(logps, ref)
    by_hand = [[0.0, 2 - math.log(2) - 1], [0.5 + math.log(2) - 1, math.e - 2]]
    assert torch.allclose(kl, torch.tensor(by_hand, dtype=torch.float64))
    adv, mask = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([[1, 1], [1, 0]])
    plain = float(trl_loss(logps, None, adv, mask, 0.2, None, "dapo", 4))  # ratio 1: -A per token
    assert plain == pytest.approx((-1 - 1 + 2) / 3)
    with_kl = float(trl_loss(logps, None, adv, mask, 0.2, None, "dapo", 4, None, kl, 0.5))
    assert with_kl == pytest.approx(plain + 0.5 * (by_hand[0][0] + by_hand[0][1] + by_hand[1][0]) / 3)


def test_noisy_rewards_flip_by_key_at_their_rates():
    """Zeros flip at rho_plus, ones at rho_minus, each completion by its own (step, prompt, sample) key: the same
    completion gets the same verdict in any batch order, and another step draws again."""
    prompts, group = list(range(200)), 4
    zeros = torch.zeros(len(prompts) * group, dtype=torch.float64)
    ones = torch.ones_like(zeros)
    flipped_up = noisy_rewards(zeros, prompts, group, 3, 7, 0.3, 0.0)
    assert set(flipped_up.tolist()) == {0.0, 1.0} and abs(float(flipped_up.mean()) - 0.3) < 0.05
    assert torch.equal(noisy_rewards(ones, prompts, group, 3, 7, 0.3, 0.0), ones)  # rho_minus = 0: no 1 drops
    assert abs(float(1 - noisy_rewards(ones, prompts, group, 3, 7, 0.0, 0.1).mean()) - 0.1) < 0.04
    reversed_ = noisy_rewards(zeros, prompts[::-1], group, 3, 7, 0.3, 0.0).view(-1, group).flip(0).reshape(-1)
    assert torch.equal(reversed_, flipped_up)
    assert not torch.equal(noisy_rewards(zeros, prompts, group, 4, 7, 0.3, 0.0), flipped_up)
    assert torch.isnan(noisy_rewards(torch.tensor([math.nan, 0.0]), [0], 2, 0, 7, 0.9, 0.0)[0])


def test_the_reference_learns_and_repeats_itself():
    cfg = tiny_config(steps=6)
    a, b = train_reference(cfg), train_reference(cfg)
    assert a.losses == b.losses and a.losses[-1] < a.losses[0] - 0.3
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert a.samples[0] != a.samples[1] and len(set(a.samples[0]) | set(a.samples[1])) == 16
