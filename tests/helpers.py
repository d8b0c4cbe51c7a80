"""Helpers shared by tests: small configs, the single-process reference run, error measures, and the
test-side fault hooks (faults live in test code, never in production config)."""

from __future__ import annotations

import torch

from elastic.core.config import (
    MODEL_PRESETS,
    Config,
    DataConfig,
    OptimConfig,
    RuntimeConfig,
    TrainConfig,
)


def tiny_config(dtype: str = "float64", steps: int = 10, global_batch: int = 8, seq_len: int = 16,
                dataset: str = "stdlib", ahead: bool = False, **model_overrides) -> Config:
    """A tiny model's run. ``ahead``: the controller builds next and fallback skeletons in the background
    (``control.prepare_ahead``); off by default, since a tiny model's step is shorter than a build and the
    extra processes' work would slow every test. The tests of that path turn it on."""
    model = MODEL_PRESETS["tiny"]
    if model_overrides:
        import dataclasses

        model = dataclasses.replace(model, **model_overrides)
    from elastic.control.config import ControlConfig

    return Config(
        model=model,
        data=DataConfig(dataset=dataset, seq_len=seq_len, max_corpus_bytes=200_000, num_samples=2000),
        train=TrainConfig(steps=steps, global_batch=global_batch, dtype=dtype, seed=1234),
        # A high LR and a clip that binds make the runs sensitive to any mistake.
        optim=OptimConfig(lr=1e-2, warmup_steps=2, grad_clip=1.0),
        # With ``ahead``, moves still happen at the step their event arrives (the commit waits for the build),
        # so tests can say which layout ran which step.
        runtime=RuntimeConfig(workers=4, collective_timeout_s=60, store_timeout_s=60),
    ).replace(control=ControlConfig(prepare_ahead=ahead, prepare_wait_steps=0))


class WaitForWorkers:
    """An event source that blocks while workers warm up, so a scale-out reshards at a known step.

    In production new workers warm up while training goes on and join whenever they are ready; a
    test that asserts which layout ran at which step waits for them instead.
    """

    def __init__(self, group, timeout_s: float = 120.0) -> None:
        self.group, self.timeout_s = group, timeout_s

    def poll(self, step: int) -> list:
        self.group.wait_warm(self.timeout_s)
        return []


class DelayTransfers:
    """A worker task that makes every later reshard transfer of that worker pause ``seconds`` after
    its group forms (a window in which a test can kill workers mid-transfer). ``marker``: a file the
    worker creates as each pause begins, so a test kills inside the window instead of guessing when it
    opens. Test code only: it patches the worker process's ``elastic.runtime.transfer.execute``."""

    def __init__(self, seconds: float, marker: str | None = None) -> None:
        self.seconds, self.marker = seconds, marker

    def run(self, ctx) -> bool:
        import time
        from pathlib import Path

        from elastic.runtime import transfer

        original = getattr(transfer.execute, "undelayed", transfer.execute)
        seconds, marker = self.seconds, self.marker

        def delayed(work, me, old, old_boxes, new_boxes, dtype, group, *args, **kwargs):
            if group is not None:
                if marker:
                    Path(marker).touch()
                time.sleep(seconds)
            return original(work, me, old, old_boxes, new_boxes, dtype, group, *args, **kwargs)

        delayed.undelayed = original
        transfer.execute = delayed
        return True


class _OneStall:
    """A worker task that wraps ``module.name`` in the worker process: the next call for which
    ``when(*args)`` holds sleeps ``seconds`` first (once). ``marker``: a file the worker creates as the
    stall begins, so a test kills inside it instead of guessing when it starts. Test code only."""

    module: str
    name: str

    def __init__(self, seconds: float, marker: str | None = None) -> None:
        self.seconds, self.marker = seconds, marker

    def when(self, *args) -> bool:
        return True

    def run(self, ctx) -> bool:
        import importlib
        import time
        from pathlib import Path

        module = importlib.import_module(self.module)
        owner = module
        path = self.name.split(".")
        for part in path[:-1]:
            owner = getattr(owner, part)
        original = getattr(getattr(owner, path[-1]), "unstalled", getattr(owner, path[-1]))
        task, fired = self, []

        def stalled(*args, **kwargs):
            if not fired and task.when(*args):
                fired.append(True)
                if task.marker:
                    Path(task.marker).touch()
                time.sleep(task.seconds)
            return original(*args, **kwargs)

        stalled.unstalled = original
        setattr(owner, path[-1], stalled)
        return True


class StallBeforeClip(_OneStall):
    """The worker's next step stops before gradient clipping, whose all-reduce its peers are then blocked in."""

    module, name = "elastic.runtime.engine", "clip_grad_norm_"


class StallCheckpointWrite(_OneStall):
    """The worker's next checkpoint shard write stalls before it writes."""

    module, name = "elastic.core.checkpoint", "write_shard"


class StallFinalGather(_OneStall):
    """The worker stalls when the driver gathers its tensors after the last step."""

    module, name = "elastic.runtime.engine", "Engine.local_tensors"

    def when(self, engine) -> bool:
        return engine.step >= engine.cfg.train.steps


class TokenisedFiles:
    """A worker task: how many data files this worker process has tokenised (``core/token_cache.py``)."""

    needs_engine = False  # a probe of the process: runs on an idle worker too

    def run(self, ctx) -> int:
        from elastic.core import token_cache

        return token_cache.TOKENISED["files"]


def assert_exactly_once(history, steps: int, batch: int, num_samples: int, tries=None, recoveries=()) -> None:
    """The ledger, from what the ranks reported: steps 0..steps-1 once each, and sample j of step s is
    position s * batch + j, so every epoch (``num_samples`` positions) uses each index exactly once and a
    complete epoch uses them all. Steps that cross an epoch boundary are split at the boundary. ``tries``
    (``RunResult.tries``, every step as the ranks reported it, before the controller keeps one try per step)
    with the run's ``recoveries``: see ``assert_replays_explained``."""
    assert [h.step for h in history] == list(range(steps)), [h.step for h in history]
    if tries is not None:
        assert_replays_explained(tries, recoveries, steps)
    epochs: dict[int, list[int]] = {}
    for h in history:
        assert len(h.samples) == batch, f"step {h.step} reports {len(h.samples)} samples, not {batch}"
        for j, index in enumerate(h.samples):
            epochs.setdefault((h.step * batch + j) // num_samples, []).append(index)
    for epoch, indices in epochs.items():
        assert len(indices) == len(set(indices)), f"epoch {epoch} used a sample twice"
        complete = (epoch + 1) * num_samples <= steps * batch
        assert not complete or sorted(indices) == list(range(num_samples)), f"epoch {epoch} missed samples"


def assert_replays_explained(tries, recoveries, steps: int) -> None:
    """Issue 28 item 3: every try the ranks reported, in order, before the controller de-duplicates. Each step
    follows the one before, except right after a recovery that restored an older state: a recovery that ended
    at step ``at`` having lost ``steps_lost`` steps replays steps at .. at + steps_lost - 1, once. Any other
    step reported again (a step applied twice: its update already in the state it ran on) fails; so does a
    replay that trained on other samples than the first try."""
    rollbacks = [(r["step"], r["steps_lost"]) for r in recoveries if r["steps_lost"] > 0]
    first: dict[int, list[int]] = {}
    expect = 0
    for t in tries:
        if t.step != expect:  # recoveries in a row (a loss during a recovery) roll back from where the last ended
            now = expect
            while rollbacks and now != t.step and sum(rollbacks[0]) == now:
                now = rollbacks.pop(0)[0]
            assert now == t.step, (
                f"step {t.step} reported after step {expect - 1}, and no recovery explains it (rollbacks to "
                f"(step, steps lost) {rollbacks}): a step applied twice; tries {[x.step for x in tries]}")
        assert sorted(first.setdefault(t.step, sorted(t.samples))) == sorted(t.samples), (
            f"step {t.step}'s replay trained on other samples than its first try")
        expect = t.step + 1
    assert expect == steps and not rollbacks, (expect, rollbacks, [x.step for x in tries])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 for empty tensors)."""
    if b.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


def worst_state_err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert set(got) == set(ref), f"state keys differ: {set(got) ^ set(ref)}"
    errs = {k: rel_err(got[k], ref[k]) for k in ref}
    name = max(errs, key=errs.get)
    return errs[name], name


def worst_update_err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
                     start: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The worst parameter's ||(got - start) - (ref - start)|| / ||ref - start||: how far a run's weights are
    from the reference's, against how far training moved them. For bf16 compute, where AdamW turns the
    rounding of a near-zero gradient into a full +-lr step on that element, so a max-abs measure sees one
    element's flips; moments are left out for the same reason (their dtypes are checked instead)."""
    errs = {k: float(((got[k] - start[k]).double() - (ref[k] - start[k]).double()).norm()
                     / (ref[k] - start[k]).double().norm().clamp_min(1e-300)) for k in ref if "::" not in k}
    name = max(errs, key=errs.get)
    return errs[name], name


def digit_reward(prompt: str, completion: str) -> float:
    """A graded reward with spread even for an untrained model (the share of byte-tokens that are
    ASCII printable), so GRPO advantages are non-zero in tests."""
    return sum(32 <= ord(c) < 127 for c in completion) / max(len(completion), 1)



def printable_majority(prompt: str, completion: str) -> float:
    """A 0/1 reward (a verifier's verdict, so the flip channel of reward noise applies): 1 when most of the
    completion's characters are ASCII printable. An untrained model's groups get both verdicts."""
    return float(digit_reward(prompt, completion) >= 0.5)


class KillInRollout:
    """A worker task: the worker SIGKILLs its own process when it starts sampling GRPO step ``grpo_step``'s
    rollouts (a crash during a rollout, at a known step). Test code only: it patches the worker process's
    ``elastic.recipes.grpo.worker.rollout``."""

    needs_engine = False  # installed on an idle worker, before the run gives it an engine

    def __init__(self, grpo_step: int) -> None:
        self.grpo_step = grpo_step

    def run(self, ctx) -> bool:
        import os
        import signal

        from elastic.recipes.grpo import worker

        original = getattr(worker.rollout, "unkilled", worker.rollout)
        at = self.grpo_step

        def killed(engine, prompts, grpo, grpo_step, *args, **kwargs):
            if grpo_step == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(engine, prompts, grpo, grpo_step, *args, **kwargs)

        killed.unkilled = original
        worker.rollout = killed
        return True


class KillAfterCommit:
    """A worker task: the worker SIGKILLs its own process as it starts applying step ``step``'s update, that is
    once every rank computed the step and the driver committed it (``Engine.sync``). Test code only: it patches
    ``elastic.runtime.engine.Engine.sync`` in the worker's process."""

    needs_engine = False

    def __init__(self, step: int) -> None:
        self.step = step

    def run(self, ctx) -> bool:
        import os
        import signal

        from elastic.runtime.engine import Engine

        original = getattr(Engine.sync, "unkilled", Engine.sync)
        at = self.step

        def killed(engine, committed):
            if engine.pending == at and committed > at:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(engine, committed)

        killed.unkilled = original
        Engine.sync = killed
        return True


def trl_style_reward(prompts, completions, answer, completion_ids, **kwargs):
    """A reward in TRL's ``reward_funcs`` convention (one call per batch, extra columns as keyword lists):
    graded, so GRPO advantages are non-zero even for an untrained model."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]  # TRL: messages after a chat
    return [(sum(ids) % 5) / 4 + (1.0 if text.strip().startswith(a) else 0.0)
            for text, ids, a in zip(texts, completion_ids, answer, strict=True)]


def trl_style_bonus(prompts, completions, **kwargs):
    """A second reward function (they add up); None where it does not apply, as TRL allows."""
    return [0.25 if isinstance(p, list) else None for p in prompts]


class SlowNextStep:
    """A worker task: the worker's next training step first computes for ``seconds`` (a slow batch, not a
    hang: its compute thread burns CPU throughout). Test code only: it patches ``Engine.compute`` in the
    worker's process."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def run(self, ctx) -> bool:
        import time

        import torch

        from elastic.runtime.engine import Engine

        original = getattr(Engine.compute, "unslowed", Engine.compute)
        seconds, fired = self.seconds, []

        def slow(engine, *args, **kwargs):
            if not fired:
                fired.append(True)
                a, end = torch.randn(64, 64), time.perf_counter() + seconds
                while time.perf_counter() < end:
                    a = torch.tanh(a @ a)
            return original(engine, *args, **kwargs)

        slow.unslowed = original
        Engine.compute = slow
        return True


def peaked_stage():
    """A tiny model with q/k norms and q/k/v biases, float64 weights of std 0.3 (seeded): peaked next-token
    distributions, so that a wrong logit changes the samples. For sampling and padding tests."""
    import dataclasses

    import torch

    from elastic.core.config import MODEL_PRESETS
    from elastic.model.llama import LlamaStage

    cfg = dataclasses.replace(MODEL_PRESETS["tiny"], qk_norm=True, qkv_bias=True)
    torch.manual_seed(0)
    m = LlamaStage(cfg).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m
