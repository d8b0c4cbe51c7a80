"""The private Ray calls ``driver/ray_compat.py`` makes still exist with the shapes it assumes.

If a Ray upgrade renames or reshapes them, this fails by name; without it the job would silently stop
seeing preemption notices (``DrainWatcher`` gets an empty answer) or the drain tests could not send one.
The calls themselves run against a real cluster in ``tests/integration/cluster_scenario.py``.
"""

from __future__ import annotations

import inspect

import pytest
import ray
from ray._private.state import GlobalState, state
from ray.core.generated import autoscaler_pb2

from elastic.driver import ray_compat

pytestmark = pytest.mark.timeout(30)


def test_the_drain_state_is_read_where_ray_train_reads_it():
    assert isinstance(state, GlobalState)
    assert list(inspect.signature(GlobalState.get_draining_nodes).parameters) == ["self"]
    assert "deadline" in (GlobalState.get_draining_nodes.__doc__ or "")  # {node id hex: deadline ms, 0 for none}


def test_a_drain_request_goes_through_the_gcs_client_with_ray_s_reasons():
    # GcsClient forwards what it does not define to InnerGcsClient (``__getattr__``), where drain_node lives.
    assert hasattr(ray._raylet.GcsClient, "__getattr__")
    assert callable(getattr(ray._raylet.InnerGcsClient, "drain_node", None))
    for reason in ray_compat.DRAIN_REASONS:
        assert autoscaler_pb2.DrainNodeReason.Value(f"DRAIN_NODE_REASON_{reason}") > 0


def test_a_bad_drain_reason_is_refused_before_any_call():
    with pytest.raises(ValueError, match="PREEMPTION"):
        ray_compat.drain_node("127.0.0.1:1", "ab" * 28, 10.0, reason="SPOT")
