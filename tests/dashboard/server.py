"""A dashboard server for the browser test and bench/dashboard_load.py: started through
``tally.dashboard.launch`` on a free localhost port, in its own process group, always stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, log: str = "its output") -> str:
    """Poll Streamlit's health endpoint until it answers; fail early if the server died."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"dashboard exited with {proc.returncode}; see {log}")
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return url
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"dashboard not up after {START_TIMEOUT_S} s; see {log}")
        time.sleep(0.1)


@contextmanager
def dashboard_server(root: Path, log_path: Path | None = None, command: list[str] | None = None,
                     port: int | None = None) -> Iterator[str]:
    """``tally.dashboard.launch.launch`` on ``root`` in a subprocess (own process group, always killed);
    yields its URL once healthy. ``command`` replaces the launcher (the bench's bare-Streamlit floor).
    The server's output goes to ``log_path`` (default: a temporary file, removed afterwards); ``port``
    defaults to a free one."""
    port = port or free_port()
    code = ("import sys; from tally.dashboard.launch import launch; "
            "sys.exit(launch(sys.argv[1], int(sys.argv[2])))")
    cmd = command or [sys.executable, "-c", code, str(root), str(port)]
    cmd = [str(port) if part == "{port}" else part for part in cmd]
    temporary = log_path is None
    if temporary:
        fd, name = tempfile.mkstemp(prefix="tally-dashboard-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield wait_healthy(proc, f"http://127.0.0.1:{port}", str(log_path))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # launch() and its streamlit child
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        if temporary:
            Path(log_path).unlink(missing_ok=True)
