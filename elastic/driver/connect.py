"""Attach the driver to Ray: an existing cluster (``--address``, ``RAY_ADDRESS`` or inside ``ray job
submit``), or a new local one.

Ray 2.60 uses token authentication. A driver connecting to a cluster started with ``ray start --head``
must run with ``RAY_AUTH_MODE=token``; without it Ray retries silently for minutes. Ray reads the mode
into its C++ config when ``ray`` is first imported, so setting the variable later is not enough: this
module sets it before importing ray, and ``token_auth_ready`` refreshes Ray's cached config when ray
was imported earlier by the user's own code. Imports nothing heavy (no torch).
"""

from __future__ import annotations

import os

AUTH_MODE = "RAY_AUTH_MODE"


def token_auth_ready() -> None:
    """Make this process use token auth, whether or not ray has been imported yet."""
    if os.environ.get(AUTH_MODE, "").lower() == "token":
        return
    os.environ[AUTH_MODE] = "token"
    import sys

    if "ray" in sys.modules:  # ray cached the mode at import: re-read it (what ray itself does to enable it)
        from ray._raylet import Config

        Config.initialize("")


def connect_ray(address: str | None = None, num_cpus: float | None = None) -> None:
    """Attach to ``address`` (or the job's cluster inside ``ray job submit``), else start a local Ray."""
    token_auth_ready()
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    else:
        # "local": a new cluster of our own, never one a previous run left behind on this machine.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
