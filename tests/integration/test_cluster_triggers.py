"""Real triggers: a Ray node joining makes the job scale out; Ray draining it makes the job move off it live.

Runs ``cluster_scenario.py`` in a subprocess because it needs its own multi-node Ray cluster
(``ray.cluster_utils.Cluster`` starts real raylets), separate from the session's Ray; the session starts it
in the background as soon as the tests are collected (``background.py``). The scenario holds the job still
while the cluster changes, so a dozen float64 steps carry both moves and the weights are the reference's to
1e-9; it reports every step as the ranks did, for the exactly-once ledger.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests import helpers
from tests.integration import background


def reported(rows: list) -> list[SimpleNamespace]:
    """The scenario's [step, samples] rows as the step summaries the ledger reads."""
    return [SimpleNamespace(step=step, samples=samples) for step, samples in rows]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_node_join_scales_out_and_a_drained_node_is_left_live_before_its_deadline():
    out = background.result("cluster_scenario")[-1]
    kinds = [e["kind"] for e in out["events"]]
    texts = [e.get("text", "") for e in out["events"]]
    # Scale-out with no operator action: the capacity change came from Ray's cluster view.
    assert any("cluster capacity 4 -> 8" in t for t in texts), texts
    assert any(e["kind"] == "reshard" and "-> dp=8" in e["text"] for e in out["events"]), texts
    # The job held still while the new node's workers warmed: no more than two steps between the node's arrival
    # and the first step on eight workers (one while they start, one at the boundary they are seen warm).
    timeline = out["timeline"]
    assert None not in (timeline.get("add_node"), timeline.get("scaled_out")), timeline
    assert timeline["scaled_out"] - timeline["add_node"] <= 2, timeline
    # Ray's preemption notice (GCS DrainNode with a deadline) moved the job off the node before the deadline:
    # its workers left after their shards moved, and removing the node then lost nothing.
    assert any("Ray drains node" in t for t in texts), texts
    assert "drained" in kinds and timeline.get("drained_s", float("inf")) < out["deadline_s"], timeline
    assert timeline.get("remove_node") is not None and timeline["remove_node"] < out["steps"], timeline  # mid-run
    assert "failure" not in kinds and "recovered" not in kinds, texts
    assert any("cluster capacity 8 -> 4" in t for t in texts), texts  # a draining node's CPUs no longer count
    assert ["dp=8", 8] in out["layouts"] and ["dp=4", 4] in out["layouts"], out["layouts"]
    # Every step once and every sample exactly once, from what the ranks reported (tries: before the controller
    # keeps one try per step, so a step applied twice fails), with no recovery to explain a replay.
    helpers.assert_exactly_once(reported(out["history"]), out["steps"], out["batch"], out["num_samples"],
                                reported(out["tries"]), out["recoveries"])
    # float64, a dozen steps at the tests' high learning rate, two live reshards: the single-process run's weights.
    assert out["err"] <= 1e-9, f"{out['err_tensor']} rel err {out['err']:.2e}"
