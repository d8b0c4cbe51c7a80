"""Ray's node drain state: the one place this project reads it, through Ray APIs that are not public.

Autoscalers (autoscaler v2, KubeRay) announce a preemption by calling the GCS ``DrainNode`` API with a reason
and a deadline; ``ray drain-node --reason PREEMPTION --deadline-remaining-seconds N`` does the same by hand.
Ray exposes which nodes drain only through ``ray._private.state.state.get_draining_nodes()`` (``{node id hex:
deadline in ms since the epoch, 0 for none}``), the call Ray Train v2's preemption handling polls too, and
sends the request through ``ray._raylet.GcsClient.drain_node``. Both are private: if Ray renames or reshapes
them, ``tests/unit/test_ray_compat.py`` fails by name rather than the job silently ignoring every notice.

Assumes ``ray.init`` has been called (``draining_nodes``) or a cluster address (``drain_node``).
"""

from __future__ import annotations

import time

DRAIN_REASONS = ("PREEMPTION", "IDLE_TERMINATION")


def draining_nodes() -> dict[str, float | None]:
    """Nodes the cluster is draining: node id (hex) -> deadline in seconds since the epoch (None: no deadline)."""
    from ray._private.state import state

    return {node: (ms / 1000.0 if ms else None) for node, ms in state.get_draining_nodes().items()}


def drain_node(address: str, node_id: str, deadline_s: float | None, reason: str = "PREEMPTION",
               message: str = "elastic") -> None:
    """Ask the GCS at ``address`` to drain ``node_id`` within ``deadline_s`` seconds from now, as an autoscaler
    does before a preemption. Raises RuntimeError if the GCS refuses (Ray refuses an idle termination of a busy
    node; a preemption is always accepted)."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    if reason not in DRAIN_REASONS:
        raise ValueError(f"a drain reason is one of {DRAIN_REASONS}, got {reason!r}")
    deadline_ms = int((time.time() + deadline_s) * 1000) if deadline_s is not None else 0
    client = GcsClient(address=address)
    accepted, why = client.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value(f"DRAIN_NODE_REASON_{reason}"),
                                      message, deadline_ms)
    if not accepted:
        raise RuntimeError(f"Ray refused to drain node {node_id[:8]}: {why}")
