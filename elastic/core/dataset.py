"""What every dataset is: samples addressed by a global index, each a pair (input_ids, labels).

Labels are -100 (``IGNORE``) where no loss is taken. Pure Python and torch.
"""

from __future__ import annotations

import torch

IGNORE = -100


class Dataset:
    """Indexable samples: ``len(ds)`` training samples and ``ds.holdout`` evaluation ones."""

    seq_len: int

    def __len__(self) -> int:
        raise NotImplementedError

    def sample(self, index: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def holdout_size(self) -> int:
        raise NotImplementedError

    def batch(self, indices, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        if len(indices) == 0:
            empty = torch.empty(0, self.seq_len, dtype=torch.long)
            return empty, empty.clone()
        pairs = [self.sample(int(i), split) for i in indices]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def held_out(rows: int, fraction: float) -> int:
    """How many of ``rows`` are held out at ``fraction``: at least one when the fraction is positive, and never
    every row (at least one trains)."""
    return min(max(1, int(rows * fraction)), rows - 1) if fraction > 0 else 0
