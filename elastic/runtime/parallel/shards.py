"""Gathering one value per data shard from every rank of a placement.

Ranks that share a data-parallel index (tensor-parallel peers) hold the same rows, so each shard's
value is kept once, in data-index order. Assumes the caller has joined the placement's default
process group (world 1: no group, the rank's own value).
"""

from __future__ import annotations

import torch.distributed as dist

from elastic.core.layout import Layout


def gather_data_shards(layout: Layout, rank: int, value) -> list:
    """Every data shard's ``value`` (picklable), one per data index, in data-index order."""
    if layout.world == 1:
        return [value]
    everyone: list = [None] * layout.world
    dist.all_gather_object(everyone, (layout.data_index(rank), value))
    return [v for _, v in sorted(dict(everyone).items(), key=lambda item: item[0])]
