"""Attach the driver to Ray: an existing cluster (``--address``, ``RAY_ADDRESS`` or inside ``ray job submit``),
or a new local one, with the authentication mode the cluster uses.

Ray 2.60 clusters run with token authentication (``ray start --head``'s default) or without it
(``RAY_AUTH_MODE=disabled``). A driver must use the cluster's mode: with the wrong one, Ray either retries for
minutes or lets the driver connect and then cancels its actors ("The actor never ran"). So:

- an explicit ``RAY_AUTH_MODE`` is respected as the user set it;
- unset, a new local cluster uses Ray's default (token), and an existing cluster is reached with a token when
  one is available on this machine (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, as Ray
  reads them), else without one;
- before ``ray.init``, one GCS call with the chosen mode (``_refuse_wrong_auth``): a token cluster refuses a
  driver without a token at once (~0.1 s), where ``ray.init`` retries that refusal 20 times, a second apart, and
  then says only "Failed to connect";
- ``check_work`` runs one trivial task right after connecting, with a deadline, so that a mismatch fails at
  once in one line naming ``RAY_AUTH_MODE`` and the fix, before any worker starts.

Ray reads the mode into its C++ config when ``ray`` is first imported; ``_set_mode`` refreshes that config
when ray was imported earlier by the user's own code. Imports nothing heavy (no torch).
"""

from __future__ import annotations

import os
import sys

AUTH_MODE = "RAY_AUTH_MODE"
CHECK_S = 60.0  # the trivial task must run within this after connecting: it needs one worker process, ~1 s
PROBE_MS = 2000  # the auth probe's own deadline; a GCS that answers at all answers it in ~0.1 s


def _set_mode(mode: str) -> None:
    os.environ[AUTH_MODE] = mode
    if "ray" in sys.modules:  # ray cached the mode at import: re-read it (what ray itself does to enable it)
        from ray._raylet import Config

        Config.initialize("")


def use_token_auth() -> None:
    """Make this process use token auth, whether or not ray has been imported yet (tests, local clusters)."""
    if os.environ.get(AUTH_MODE, "").lower() != "token":
        _set_mode("token")


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return True
    return os.path.isfile(os.path.expanduser("~/.ray/auth_token"))


def connect_ray(address: str | None = None, num_cpus: float | None = None, check: bool = True) -> None:
    """Attach to ``address`` (or the job's cluster inside ``ray job submit``), else start a local Ray. ``check``:
    run one task first (a wrong auth mode fails here, in one line)."""
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray's C++ client logs a warning per failed attempt while it retries; the one line below says it all.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")
    if AUTH_MODE not in os.environ and address and address != "auto":
        _set_mode("token" if _token_available() else "disabled")
    import ray

    if ray.is_initialized():
        return
    if address:
        _refuse_wrong_auth(address)
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        except (ray.exceptions.AuthenticationError, ConnectionError) as err:
            # The address answers (the CLI checked), so a refused connection is most often the auth mode.
            raise ConnectionError(auth_hint(address, str(err))) from None
        if check:
            check_work(address)
    else:
        # "local": a new cluster of our own, never one a previous run left behind on this machine.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False, _system_config=PRELOAD)


# Ray starts idle worker processes as soon as a driver connects; these import torch and the worker's modules
# before any actor lands on them, so the first workers of a local run skip most of their start-up (measured in
# the test session on 2 cores: 4 workers warm in 16-17 s instead of 34-50 s while other work ran). A cluster
# started with ``ray start`` gets the same from ``RAY_preload_python_modules=torch,elastic.runtime.worker``.
PRELOAD = {"preload_python_modules": ["torch", "elastic.runtime.worker"]}


def auth_hint(address: str, why: str) -> str:
    mode = os.environ.get(AUTH_MODE, "unset")
    other = "disabled" if mode == "token" else "token"
    return (f"the Ray cluster at {address} did not accept this driver with {AUTH_MODE}={mode} "
            f"({(why.splitlines() or [''])[0][:160]}); if the cluster runs with the other mode, set "
            f"{AUTH_MODE}={other} (for token auth the cluster's token must be in ~/.ray/auth_token or RAY_AUTH_TOKEN)")


def _refuse_wrong_auth(address: str) -> None:
    """Raise ConnectionError naming ``RAY_AUTH_MODE`` if the GCS at ``address`` rejects this process's credentials.
    Any other outcome (it answers; it does not answer within PROBE_MS; Ray's internal client moved) leaves the
    verdict to ``ray.init``, as before."""
    if address == "auto" or "://" in address:
        return  # not a GCS address: "auto" is looked up by ray.init, ray:// is Ray Client's proxy
    import ray

    try:
        from ray._raylet import InnerGcsClient

        InnerGcsClient.standalone(address, None, PROBE_MS)
    except ray.exceptions.AuthenticationError as err:
        raise ConnectionError(auth_hint(address, str(err))) from None
    except Exception:  # noqa: BLE001 (unreachable, or the internal API changed: ray.init decides)
        return


def check_work(address: str) -> None:
    """Run one trivial task; raise ConnectionError naming ``RAY_AUTH_MODE`` if the cluster refuses it."""
    import ray

    @ray.remote(num_cpus=0)
    def ready() -> bool:
        return True

    try:
        ray.get(ready.remote(), timeout=CHECK_S)
    except ray.exceptions.GetTimeoutError:
        raise ConnectionError(f"the Ray cluster at {address} ran no task of this driver within {CHECK_S:.0f} s; if "
                              f"it is busy, retry; if not, its auth mode may differ: "
                              + auth_hint(address, "no task ran")) from None
    except ray.exceptions.RayError as err:
        raise ConnectionError(auth_hint(address, str(err))) from None
