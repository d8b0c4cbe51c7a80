"""Real triggers: a Ray node joining makes the job scale out; Ray draining it makes the job move off it live.

Runs ``cluster_scenario.py`` in a subprocess because it needs its own multi-node Ray cluster
(``ray.cluster_utils.Cluster`` starts real raylets), separate from the session's Ray; the session starts it
in the background as soon as the tests are collected (``background.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration import background

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_node_join_scales_out_and_a_drained_node_is_left_live_before_its_deadline():
    out = background.result("cluster_scenario")[-1]
    kinds = [e["kind"] for e in out["events"]]
    texts = [e.get("text", "") for e in out["events"]]
    # Scale-out with no operator action: the capacity change came from Ray's cluster view.
    assert any("cluster capacity 4 -> 8" in t for t in texts)
    assert any(e["kind"] == "reshard" and "-> dp=8" in e["text"] for e in out["events"])
    # Ray's preemption notice (GCS DrainNode with a deadline) moved the job off the node before the deadline:
    # its workers left after their shards moved, and removing the node then lost nothing.
    assert any("Ray drains node" in t for t in texts), texts
    assert out["timeline"]["drained_s"] < out["deadline_s"], out["timeline"]
    assert "failure" not in kinds and "recovered" not in kinds, texts
    assert any("cluster capacity 8 -> 4" in t for t in texts)  # a draining node's CPUs no longer count
    assert ["dp=8", 8] in out["layouts"] and ["dp=4", 4] in out["layouts"]
    # float64, ~150 steps at a high learning rate (rounding differences grow ~1e5x over such a
    # run) and two reshards: still the single-process run's weights.
    assert out["err"] < 1e-6, out
