"""Invariant 1 for every model family (Llama 3 tied, Llama with q/k/v/o biases, Qwen2, Qwen3, Mistral): a
run from a Hugging Face folder that reshards live through fsdp=2 x tp=2, dp=2 x tp=2, fsdp=4 and dp=4 ends
with the weights of transformers' own model trained in one process (``tests/reference.py`` with
``AutoModelForCausalLM``), in float64 at 1e-9.

tp shards the q/k/v biases with their projections, the per-head q/k norms stay whole (their gradient
summed over tp), and tied embeddings stay one tensor; the exported folder loads in transformers.

Qwen3 (q/k norms) also loses workers on dp=2 x tp=2: one is SIGKILLed after step 2's commit, as it applies
the update every rank computed (the step counts; the other replica serves; nothing is replayed), and its tp
peer is SIGKILLed while the job recovers from that first loss (a second loss during a recovery: the
replica that is left still holds every tensor). Two replacements warm, and the script's fsdp=4 and dp=4
follow. The ledger comes from what every rank reported, first tries and replays alike.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from elastic.control.controller import Controller
from elastic.control.events import Relayout
from elastic.control.run import with_control
from elastic.control.sources import ScriptedEvents
from elastic.control.states import Recovering
from elastic.core.config import Config, DataConfig, OptimConfig, RuntimeConfig, TrainConfig
from elastic.core.layout import Layout
from elastic.model.hf import model_config_of, save_hf_model
from tests.helpers import KillAfterCommit, WaitForWorkers, assert_exactly_once, worst_state_err
from tests.reference import cached_reference
from tests.unit.test_families import write_folder

STEPS = 8
START = "fsdp=2,tp=2"
SCRIPT = {2: "dp=2,tp=2", 4: "fsdp=4", 6: "dp=4"}


@pytest.mark.timeout(360)
@pytest.mark.parametrize("family", ["llama3-tied", "llama-bias", "qwen2-tied", "qwen3", "mistral"])
def test_family_trains_and_reshards_like_transformers(fresh_pool, tmp_path, family):
    folder, _ = write_folder(tmp_path / "base", family)
    cfg = Config(model=model_config_of(folder),
                 data=DataConfig(dataset="stdlib", seq_len=16, max_corpus_bytes=200_000),
                 train=TrainConfig(steps=STEPS, global_batch=8, dtype="float64", seed=1234, init_from=str(folder)),
                 optim=OptimConfig(lr=1e-2, warmup_steps=2, grad_clip=1.0),
                 runtime=RuntimeConfig(workers=4, collective_timeout_s=60, store_timeout_s=60))
    ref = cached_reference(cfg)
    script = ScriptedEvents({step: [Relayout(reason="test", layout=Layout.parse(text))]
                             for step, text in SCRIPT.items()})
    cfg = with_control(cfg, layout=START, prepare_wait_steps=0)
    pool, killed = fresh_pool, []
    if family == "qwen3":
        pool.run({pool.warm()[0]: KillAfterCommit(step=2)})
    controller = Controller(cfg, group=pool, sources=[script, WaitForWorkers(pool)], progress=False)

    def kill_during_recovery(transition):
        """The first loss (step 2's applier) starts a recovery: its tp peer, whose replica has no other copy, dies
        before the recovery's move."""
        if family == "qwen3" and not killed and isinstance(transition.next, Recovering):
            placement = controller.group.placement
            first = [w for w in placement.workers if w not in controller.group.live()]
            assert str(placement.layout) == "dp=2,tp=2" and len(first) == 1, (placement, first)
            index = placement.layout.data_index(placement.workers.index(first[0]))
            peer = next(w for r, w in enumerate(placement.workers)
                        if placement.layout.data_index(r) == index and w != first[0])
            killed.extend([first[0], peer])
            controller.group.kill(peer)

    controller.listeners.append(kill_during_recovery)
    try:
        result = controller.run()
    finally:
        controller.shutdown()
    layouts = [h.layout for h in result.history]
    if family == "qwen3":
        first, peer = killed
        assert not set(killed) & set(pool.live())
        # The first loss came from step 2's apply; the peer was lost before that recovery's move was done, and one
        # recovery, from the replica left, ended both, losing no step.
        kinds = [e["kind"] for e in result.events]
        assert [e["dead"] for e in result.events if e["kind"] == "failure"][0] == [first]
        assert sum(k in ("failure", "reshard failed") for k in kinds[:kinds.index("recovered")]) >= 2, kinds
        assert len(result.recoveries) == 1 and result.recoveries[0]["dead"] == sorted(killed), result.recoveries
        assert (result.recoveries[0]["how"], result.recoveries[0]["steps_lost"]) == ("replicas", 0)
        assert [t.step for t in result.tries] == list(range(STEPS))  # step 2 counted once, from its commit
        layouts[3:4] = [SCRIPT[2]]  # step 3 ran wherever the recovery put it
    assert layouts == [START] * 2 + [text for step, text in SCRIPT.items() for _ in range(2)]
    assert len(result.reshards) == 3 + len(result.recoveries)
    assert_exactly_once(result.history, STEPS, cfg.train.global_batch, cfg.data.num_samples, result.tries,
                        result.recoveries)
    err, name = worst_state_err(result.tensors, ref.tensors)
    assert err <= 1e-9, f"{family}: {name} rel err {err:.2e}"
    assert ref.losses[-1] < ref.losses[0] - 0.3  # it trained
    if cfg.model.tie_embeddings:
        assert "lm_head.weight" not in result.tensors
    # The trained weights export to a folder transformers loads with the same logits.
    weights = {k: v for k, v in result.tensors.items() if "::" not in k}
    out = save_hf_model(tmp_path / "out", cfg.model, weights)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    assert hf.config.tie_word_embeddings == cfg.model.tie_embeddings
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    ref_model.load_state_dict({k: v for k, v in ref.tensors.items() if "::" not in k}, strict=False)
    x = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = hf(x).logits, ref_model(x).logits
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-9
