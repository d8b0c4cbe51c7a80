"""Evaluation's pieces without processes: the held-out split (``data.eval_fraction``, ``data.eval_data``), the
engine's eval loss at world 1 against plain torch (``tests/reference.py``'s model), how ranks' results combine,
when an evaluation is due, and how ``metrics.jsonl`` rows of evaluations are read and drawn."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from elastic.control.evaluation import Evaluation, combine_losses
from elastic.core.config import DataConfig
from elastic.core.data import GlobalSampler, build_dataset, check_data
from elastic.core.dataset import held_out
from elastic.core.layout import Layout, Placement
from elastic.core.tokenizer import ByteTokenizer
from elastic.runtime.engine import Engine
from tests.helpers import tiny_config
from tests.reference import build_model


def _rows(path, n, tag=""):
    path.write_text("\n".join(json.dumps({"prompt": f"{tag}{i}?", "completion": f"{tag}{i}!"}) for i in range(n)))
    return path


def _completion(ds, i, split):
    return ByteTokenizer().decode([int(t) for t in ds.sample(i, split)[1] if t != -100])


def test_held_out_counts():
    assert held_out(100, 0.0) == 0
    assert held_out(100, 0.001) == 1  # a positive fraction holds out at least one row
    assert held_out(100, 0.25) == 25
    assert held_out(2, 0.9) == 1  # ... and never every row


def test_eval_fraction_holds_out_the_last_rows_which_training_never_samples(tmp_path):
    ds = build_dataset(DataConfig(dataset=str(_rows(tmp_path / "r.jsonl", 20)), seq_len=16, eval_fraction=0.25), 0)
    assert (len(ds), ds.holdout_size()) == (15, 5)
    assert [_completion(ds, i, "holdout") for i in range(5)] == [f"{i}!" for i in range(15, 20)]
    sampler = GlobalSampler(len(ds), 4, seed=3)
    trained = {_completion(ds, i, "train") for step in range(3 * 15 // 4 + 1) for i in sampler.step_indices(step)}
    assert trained == {f"{i}!" for i in range(15)}  # three epochs: every training row, no held-out one


def test_eval_data_file_is_the_held_out_set_and_training_uses_its_file_whole(tmp_path):
    train, held = _rows(tmp_path / "train.jsonl", 20), _rows(tmp_path / "eval.jsonl", 6, tag="e")
    ds = build_dataset(DataConfig(dataset=str(train), seq_len=16, eval_fraction=0.25, eval_data=str(held)), 0)
    assert (len(ds), ds.holdout_size()) == (20, 6)
    assert [_completion(ds, i, "holdout") for i in range(6)] == [f"e{i}!" for i in range(6)]
    assert _completion(ds, 19, "train") == "19!"
    with pytest.raises(ValueError, match=r"data.eval_data='nope.jsonl' is not an existing file"):
        build_dataset(DataConfig(dataset=str(train), eval_data="nope.jsonl"), 0)


def test_eval_every_without_held_out_rows_is_refused_before_any_work(tmp_path):
    cfg = tiny_config(dataset=str(_rows(tmp_path / "r.jsonl", 20)))
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, eval_fraction=0.0),
                      train=dataclasses.replace(cfg.train, eval_every=2))
    with pytest.raises(ValueError, match=r"train.eval_every=2 but .* holds out no rows"):
        check_data(cfg)


def test_engine_eval_loss_is_the_mean_token_nll_of_plain_torch():
    """World 1, float64: the engine's sum over forwards of a micro-batch's rows equals one plain forward of every
    held-out row through the reference's model."""
    cfg = tiny_config()
    engine = Engine(cfg, Placement(Layout(), (0,)), 0)
    ds = build_dataset(cfg.data, cfg.train.seed)
    rows = list(range(ds.holdout_size()))[:21]  # 21: two forwards of a micro-batch (8) and one of 5
    total, tokens = engine.eval_loss(rows)
    x, y = ds.batch(rows, "holdout")
    with torch.no_grad():
        logits = build_model(cfg)(x)
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100, reduction="sum")
    assert tokens == int((y != -100).sum()) and len(rows) > cfg.train.global_batch
    assert abs(total - float(ref)) / float(ref) <= 1e-12


def test_combine_counts_each_slice_once():
    """tp ranks of a slice repeat its sum; earlier pipeline stages report nothing."""
    placement = Placement(Layout.parse("dp=2,tp=2"), (10, 11, 12, 13))
    results = {10: (1.5, 3, 9), 11: (1.5, 3, 9), 12: (2.25, 4, 9), 13: (2.25, 4, 9)}
    assert combine_losses(results, placement) == (3.75, 7, 9)
    piped = Placement(Layout.parse("pp=2,dp=2,mb=2"), (0, 1, 2, 3))  # ranks 0, 1: stage 0; ranks 2, 3: stage 1
    assert [piped.layout.coord(r).pp for r in range(4)] == [0, 0, 1, 1]
    stages = {0: (0.0, 0, 9), 1: (0.0, 0, 9), 2: (3.0, 2, 9), 3: (4.0, 2, 9)}
    assert combine_losses(stages, piped) == (7.0, 4, 9)


def test_evaluation_is_due_every_k_committed_steps():
    never, every3 = Evaluation(0, None, lambda *a, **k: {}), Evaluation(3, None, lambda *a, **k: {})
    assert [s for s in range(10) if never.due(s)] == []
    assert [s for s in range(10) if every3.due(s)] == [3, 6, 9]


def test_read_run_merges_an_evaluation_into_its_step_and_the_plot_draws_it(tmp_path):
    from elastic.tools.metrics import read_run
    from elastic.tools.plot import plot_run, series

    rows = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3, "workers": 2, "layout": "dp=2", "time": s,
             "reward": 0.1 * s, "reward_std": 0.05} for s in range(6)]
    lines = [json.dumps(r) for r in rows[:2]] + [json.dumps({"step": 1, "eval_loss": 2.5, "eval_samples": 9})]
    lines += [json.dumps(r) for r in rows[2:]] + [json.dumps({"step": 3, "eval_loss": 2.25, "eval_samples": 9})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "events.jsonl").write_text(json.dumps({"kind": "reshard", "step": 2, "seconds": 0.5,
                                                       "new": "dp=1"}) + "\n")
    steps, _ = read_run(tmp_path)
    assert [s["step"] for s in steps] == list(range(6))
    assert steps[1]["loss"] == pytest.approx(2.9) and steps[1]["eval_loss"] == 2.5 and steps[1]["time"] == 1
    assert series(steps, "eval_loss") == ([1, 3], [2.5, 2.25])
    out = plot_run(tmp_path)
    assert out.is_file() and out.stat().st_size > 10_000


def test_flags_and_trl_names_reach_the_config(tmp_path):
    from launch.cli import build_config, parser

    held = _rows(tmp_path / "eval.jsonl", 4)
    args = parser().parse_args(["train", "--recipe", "pretrain", "--model", "tiny", "--eval-every", "3",
                                "--eval-data", str(held), "--eval-fraction", "0.1"])
    cfg, _, _ = build_config(args)
    assert (cfg.train.eval_every, cfg.data.eval_data, cfg.data.eval_fraction) == (3, str(held), 0.1)
    trl = parser().parse_args(["train", "--recipe", "pretrain", "--model", "tiny", "--eval_steps", "5"])
    assert build_config(trl)[0].train.eval_every == 5


def test_an_evaluation_the_layout_puts_off_runs_before_the_next_step_or_is_dropped():
    """GRPO's sampling needs a data-parallel layout: ``evaluate`` answers why not, and the evaluation is tried
    again before each tick while the committed step stays; once a step comes, it is dropped, with a line."""
    from types import SimpleNamespace

    answers = iter(["not on fsdp=2", "not on fsdp=2", {"eval_reward": 0.5, "eval_samples": 7}, "not on fsdp=2"])
    lines: list[str] = []
    ev = Evaluation(2, None, lambda kind, **d: lines.append(d["text"]) or d)
    ctl = SimpleNamespace(step=2, workload=SimpleNamespace(evaluate=lambda c: next(answers)))
    ev.after_step(ctl)
    ev.before_step(ctl)  # still not: one line only for the first answer
    assert ev.pending == 2 and not ev.history and lines == ["evaluation put off: not on fsdp=2"]
    ev.before_step(ctl)  # the rollout phase's layout: done, logged at step 2's 0-based row
    assert ev.pending is None and ev.history[1]["eval_reward"] == 0.5
    ctl.step = 4
    ev.after_step(ctl)
    ctl.step = 5
    ev.before_step(ctl)  # a step came first: dropped
    assert ev.pending is None and 3 not in ev.history and "evaluation of step 4 was not done" in lines[-1]


def test_grpo_on_a_prompt_file_without_held_out_prompts_is_refused_at_start(tmp_path):
    from elastic.recipes.grpo.config import GRPOConfig
    from elastic.recipes.grpo.workload import GRPOWorkload

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) for i in range(8)))
    cfg = tiny_config(dataset="arithmetic", seq_len=12).replace(grpo=GRPOConfig(prompts=str(prompts), max_new_tokens=4))
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, eval_every=2))
    with pytest.raises(ValueError, match=r"p.jsonl has no held-out prompts; give grpo.eval_prompts FILE"):
        GRPOWorkload(cfg)
    assert GRPOWorkload(cfg.replace(grpo=GRPOConfig(prompts=str(prompts), max_new_tokens=4,
                                                    eval_prompts=str(prompts)))).held.n == 8
