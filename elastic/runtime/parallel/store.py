"""A store wrapper that lets the driver abort a group's rendezvous.

Gloo's rendezvous blocks in ``store.get`` until the store timeout when a peer died before
publishing its address. Wrapping the group's (prefixed) store in ``AbortableStore`` turns every
wait into a short poll that also watches the group's ``abort`` key; the driver sets that key as
soon as it sees a member die, and everyone still forming the group fails at once.
"""

from __future__ import annotations

import time

import torch.distributed as dist

ABORT = "abort"  # the key, under a group's prefix, that calls its rendezvous off


def abort_key(group: str) -> str:
    """The driver's store key that calls off forming the group named ``group``."""
    return f"{group}/{ABORT}"


class GroupAborted(RuntimeError):
    """The driver gave up on forming a group (a member died); raised instead of waiting out a timeout."""


def wait_keys(store: dist.Store, keys: list[str], timeout_s: float, poll_s: float = 0.003) -> None:
    """Wait until every key exists, or fail at once if the group's ``abort`` key is set."""
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        if store.check([ABORT]):
            raise GroupAborted("the driver aborted forming this group because a member was lost")
        if time.monotonic() > deadline:
            missing = [k for k in keys if not store.check([k])]
            raise TimeoutError(f"peers did not arrive within {timeout_s:.0f} s (missing keys {missing[:4]})")
        time.sleep(poll_s)


class AbortableStore(dist.Store):
    """Delegates to ``inner``; blocking reads poll instead, and honour the ``abort`` key."""

    def __init__(self, inner: dist.Store, timeout_s: float) -> None:
        super().__init__()
        self.inner, self.timeout_s = inner, timeout_s

    def set(self, key, value):
        self.inner.set(key, value)

    def get(self, key):
        wait_keys(self.inner, [key], self.timeout_s)
        return self.inner.get(key)

    def wait(self, keys, timeout=None):
        # Gloo passes its own timeout, which is the short connect timeout while a group forms
        # (``connections.CONNECT_TIMEOUT_S``): waiting for peers to arrive is the rendezvous's business, so it
        # never waits less than this store's timeout, and the ``abort`` key still ends it at once.
        given = 0.0 if timeout is None else timeout.total_seconds()
        wait_keys(self.inner, list(keys), max(self.timeout_s, given))

    def check(self, keys):
        return self.inner.check(keys)

    def add(self, key, value):
        return self.inner.add(key, value)

    def compare_set(self, key, expected, desired):
        return self.inner.compare_set(key, expected, desired)

    def delete_key(self, key):
        return self.inner.delete_key(key)

    def num_keys(self):
        return self.inner.num_keys()

    def set_timeout(self, timeout):
        self.timeout_s = timeout.total_seconds()
