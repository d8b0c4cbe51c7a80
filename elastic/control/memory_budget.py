"""What the policy is told about the cluster before it decides: each worker's node, and its memory budget.

The budget per worker is ``plan.memory_budgets.node_budgets``: the memory Ray found on the worker's node (its
``memory`` resource plus the object store's share, ``Membership.node_memory``), times the headroom, less the
idle RSS of the job's workers there, divided among them. ``runtime.memory_per_worker_gb`` overrides it (the
policy reads that itself). A group that knows no node sizes (the controller tests' fake group) gives no
budget, and memory then limits nothing, as before budgets existed.
"""

from __future__ import annotations

from elastic.driver.group import WorkerGroup
from elastic.plan.memory_budgets import node_budgets
from elastic.plan.policy import Policy


def see_cluster(policy: Policy, group: WorkerGroup) -> None:
    """Set ``policy.nodes`` and ``policy.budgets`` from the group's workers as they are now."""
    policy.nodes = nodes = group.nodes()
    if policy.cfg.runtime.memory_per_worker_gb:
        return
    policy.budgets = node_budgets(nodes, group.node_memory(), group.idle_bytes())
