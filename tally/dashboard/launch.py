"""Start the dashboard as a Streamlit server on a results store (``tally dashboard``).

Why a subprocess running Streamlit's own command line: Streamlit owns its event loop and signal
handling, and the same interpreter (the venv's) guarantees the app imports this installed package.
Binds to 127.0.0.1 by default: the store may hold unpublished results; expose it deliberately with
``address="0.0.0.0"`` (or an SSH tunnel).

The subprocess is ``python -m tally.dashboard.serve`` rather than ``python -m streamlit``: it
imports what the first page needs before the server listens (see that module).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from pathlib import Path

from tally.dashboard import APP_PATH


def command(root: Path | str, port: int = 8501, address: str = "127.0.0.1") -> list[str]:
    """The server's command line (shown by callers, used by ``launch`` and the browser test): Streamlit's
    ``streamlit run APP ...`` arguments, run through ``tally.dashboard.serve``'s warm start."""
    return [sys.executable, "-m", "tally.dashboard.serve", "run", str(APP_PATH),
            "--server.address", str(address), "--server.port", str(int(port)),
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--", "--root", str(Path(root).expanduser().resolve())]


def launch(root: Path | str, port: int = 8501, address: str = "127.0.0.1") -> int:
    """Run the dashboard in the foreground until it exits; returns its exit code.

    Ctrl-C and SIGTERM are passed on to the server, so stopping ``tally dashboard`` never leaves an
    orphaned Streamlit process holding the port.
    """
    proc = subprocess.Popen(command(root, port, address))
    previous = None
    with contextlib.suppress(ValueError):  # signal handlers can only be set in the main thread
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.terminate())
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                proc.terminate()  # then wait again for a clean shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

