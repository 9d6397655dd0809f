"""Start the dashboard as a Streamlit server on a results store (``tally dashboard``).

Why a subprocess running Streamlit's own command line: Streamlit owns its event loop and signal
handling, and the same interpreter (the venv's) guarantees the app imports this installed package.
Binds to 127.0.0.1 by default: the store may hold unpublished results; expose it deliberately with
``address="0.0.0.0"`` (or an SSH tunnel).

Why ``python -m tally.dashboard.launch`` rather than ``python -m streamlit``: the subprocess imports
what the first page needs (pandas, pyarrow, the data layer) before the server starts listening.
Streamlit imports them lazily inside the first script run, so without this the first visitor of a
fresh server waits for them (bench/dashboard_load.py: most of a cold first load on 2 busy cores).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from pathlib import Path

from tally.dashboard import APP_PATH

FIRST_PAGE_MODULES = ("numpy", "pandas", "pyarrow", "pyarrow.parquet", "yaml", "streamlit.dataframe_util",
                      "tally.dashboard.data")  # never modules with st.cache_* (they need the runtime)


def command(root: Path | str, port: int = 8501, address: str = "127.0.0.1") -> list[str]:
    """The server's command line (shown by callers, used by ``launch`` and the browser test): Streamlit's
    ``streamlit run APP ...`` arguments, run through this module's warm start (see the module doc)."""
    return [sys.executable, "-m", "tally.dashboard.launch", "run", str(APP_PATH),
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


def _serve() -> None:
    """``python -m tally.dashboard.launch run APP [streamlit options]``: import the first page's modules,
    then hand the arguments to Streamlit's command line, exactly as ``python -m streamlit`` does."""
    import importlib

    for name in FIRST_PAGE_MODULES:
        importlib.import_module(name)
    from streamlit import delta_generator
    from streamlit.web import cli

    # Streamlit's first element of a process checks whether it runs in a REPL (to warn about a bare
    # `python app.py`) with inspect.stack(), which reads the source of every frame: 0.1-0.2 s of the
    # first visitor's wait. We are `streamlit run`, so the warning can never apply: mark it shown.
    delta_generator._use_warning_has_been_displayed = True

    cli.main(prog_name="streamlit")


if __name__ == "__main__":
    _serve()
