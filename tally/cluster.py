"""Ray for the whole project, closed by default: the one place that starts a local Ray or joins a cluster.

`tally search`, `tally serve`, `tally train --workers`, the benches and the tests all come through
`start_or_join`. What it guarantees:

- A local Ray listens on loopback only. `ray.init(_node_ip_address="127.0.0.1")` alone is not enough
  in Ray 2.60: `services.resolve_ip_for_localhost` turns 127.0.0.1 back into the machine's external
  address, and the GCS, raylet, workers and the dashboard agent then bind all interfaces (19 sockets
  outside loopback during a 1-trial search). Ray keeps a local-only mode for macOS and Windows
  (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`: the node address is 127.0.0.1 and every C++ and Python
  server binds it); we turn it on for the Rays we start. The dashboard binds 127.0.0.1 as well.
- Ray's token authentication stays on: Ray 2.59+ turns it on for a new local cluster, writing the
  token to ~/.ray/auth_token (or reading RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH). Every process Ray
  starts inherits RAY_AUTH_MODE=token. Joining a cluster needs that cluster's token; without one we
  stop with one line saying how to provide it. A RAY_AUTH_MODE other than token is refused in one
  line: the platform never runs a Ray whose job API is open to whoever reaches its ports.
- Ray's usage-stats reporting is off (RAY_USAGE_STATS_ENABLED=0) unless the user set it.

Only ``ray`` is imported, and lazily: the store and the dashboard never need it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from tally.errors import TallyError

LOOPBACK = "127.0.0.1"
AUTH_MODE = "RAY_AUTH_MODE"
TOKEN_HELP = ("set RAY_AUTH_TOKEN to the cluster's token, or put it in ~/.ray/auth_token "
              "(or a file named by RAY_AUTH_TOKEN_PATH); see platform/README.md")


def quiet_env() -> None:
    """Nothing phones home from the Rays this process starts (an explicit user value wins)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def token_available() -> bool:
    """Whether Ray will find an authentication token (the places Ray's own loader reads, in its order)."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(path).expanduser() if path else Path.home() / ".ray" / "auth_token"
    try:
        return bool(path.read_text().strip())
    except OSError:
        return False


def require_token_auth() -> None:
    """Ray's token authentication on for every Ray the project starts or joins (and their children)."""
    mode = os.environ.get(AUTH_MODE, "token")
    if mode.lower() != "token":
        raise TallyError(f"{AUTH_MODE}={mode}: the platform runs Ray only with token authentication "
                         f"(unset {AUTH_MODE} or set it to token)")
    os.environ[AUTH_MODE] = "token"
    # Ray's C++ config reads RAY_AUTH_MODE once per process and caches it; a process that touched Ray
    # before this call (an import, a test) would keep "disabled", make no token, send none, and be
    # refused by its own GCS. Ray refreshes the cache the same way when it turns token auth on itself.
    from ray._raylet import Config

    Config.initialize("")


def _loopback_only() -> None:
    """Ray's local-only mode (see the module docstring); the child processes inherit the variable, and
    the already-imported constant is set too because Ray read the environment at import."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


@contextlib.contextmanager
def own_cluster_address():
    """Around a local ray.init: the new Ray listens on a port chosen here and every process it starts
    inherits RAY_ADDRESS naming it (the driver's own environment is restored afterwards).

    Train's PlacementGroupCleaner finds "the" local Ray through RAY_ADDRESS or by looking for running
    Ray processes; with two local Rays on one machine it finds both, raises, stops watching, and the
    next trials wait for CPUs that never come back (tally/search/lean.py)."""
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_GCS_SERVER_PORT"):
        yield  # the caller chose already
        return
    from ray.util import get_node_ip_address

    with socket.socket() as probe:  # a free loopback port; Ray binds it a moment later
        probe.bind((LOOPBACK, 0))
        port = probe.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"
    try:
        yield
    finally:  # the GCS, raylet and dashboard have inherited them; later ray.init calls here must not
        os.environ.pop("RAY_GCS_SERVER_PORT", None)
        os.environ.pop("RAY_ADDRESS", None)


def start_or_join(address: str | None = None, *, dashboard: bool = False, quiet: bool = True,
                  own_address: bool = False, **init_options) -> bool:
    """Join the Ray cluster at ``address`` (its token required), or start a local one on loopback.

    ``dashboard``: start the dashboard process (Train V2 inside Tune needs its State API to free the
    workers of stopped trials: RAY_NOTES); bound to 127.0.0.1. ``own_address``: give the local Ray's
    processes its address (see own_cluster_address). ``init_options`` go to ray.init for a local Ray
    (num_cpus, resources, object_store_memory). Returns True when this call started a local Ray.
    """
    import ray

    quiet_env()
    if ray.is_initialized():
        return False
    logging = {"log_to_driver": not quiet, "configure_logging": True, "logging_level": "ERROR"}
    if address:
        require_token_auth()
        if not token_available():
            raise TallyError(f"--address {address}: joining a Ray cluster needs its authentication token: "
                             + TOKEN_HELP)
        ray.init(address=address, **logging)
        return False
    require_token_auth()  # Ray makes the local cluster's token (~/.ray/auth_token)
    _loopback_only()
    with own_cluster_address() if own_address else contextlib.nullcontext():
        ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=dashboard,
                 dashboard_host=LOOPBACK, **logging, **init_options)
    return True
