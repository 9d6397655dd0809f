"""Start the dashboard as a Streamlit server on a results store (``tally dashboard``).

Why exec Streamlit's own command line: Streamlit owns its event loop and signal handling, the same
interpreter (the venv's) guarantees the app imports this installed package, and replacing this
process (rather than starting a child) ties the server's life to the command's.
Binds to 127.0.0.1 by default: the store holds configs, bundles, server paths and unpublished
results, and the dashboard has no login. Share it through an SSH tunnel or a reverse proxy with
authentication (docs/DASHBOARD.md); another address needs ``allow_remote`` and prints a warning.
Streamlit's developer toolbar (its "Deploy" button, rerun, clear cache) is hidden: this is a
self-hosted tool, viewed, not edited.

The server is ``python -m tally.dashboard.serve`` rather than ``python -m streamlit``: it
imports what the first page needs before the server listens (see that module).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tally.dashboard import APP_PATH
from tally.errors import TallyError
from tally.results.storage import is_remote

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_address(address: str, allow_remote: bool) -> str | None:
    """Refuse a non-loopback bind address unless allowed; the one warning line to print when allowed."""
    if str(address) in LOOPBACK or str(address).startswith("127."):
        return None
    if not allow_remote:
        raise TallyError(f"--address {address}: the dashboard has no login and serves configs, bundles and "
                         "paths to anyone who reaches it; share it through an SSH tunnel or a reverse proxy "
                         "with authentication (docs/DASHBOARD.md), or pass --allow-remote")
    return (f"warning: the dashboard listens on {address} without authentication: anyone who reaches "
            "this port reads the whole store")


def command(root: Path | str, port: int = 8501, address: str = "127.0.0.1") -> list[str]:
    """The server's command line (shown by callers, used by ``launch`` and the browser test): Streamlit's
    ``streamlit run APP ...`` arguments, run through ``tally.dashboard.serve``'s warm start."""
    return [sys.executable, "-m", "tally.dashboard.serve", "run", str(APP_PATH),
            "--server.address", str(address), "--server.port", str(int(port)),
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "viewer",  # no "Deploy", rerun or clear-cache: a self-hosted viewer
            "--", "--root", root if is_remote(root) else str(Path(root).expanduser().resolve())]


def launch(root: Path | str, port: int = 8501, address: str = "127.0.0.1", allow_remote: bool = False) -> int:
    """Become the dashboard server (exec): the process that was ``tally dashboard`` is the Streamlit
    server, so Ctrl-C, SIGTERM and even kill -9 of it end the server; nothing is left holding the port.
    Never returns (the return type is the CLI's: exec failing raises OSError)."""
    warning = check_address(address, allow_remote)
    if warning:
        print(warning, file=sys.stderr)
    argv = command(root, port, address)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
    raise AssertionError("unreachable: execv returned")
