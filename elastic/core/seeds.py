"""Seeds from names: every random draw of a run is a function of (seed, what, step, index).

So a sample, a parameter's initial value or a reward flip does not depend on which worker draws it,
on its batch-mates or on the layout, and a replay draws the same numbers. Pure Python.
"""

from __future__ import annotations

import hashlib


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, stable across processes and Python versions."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
