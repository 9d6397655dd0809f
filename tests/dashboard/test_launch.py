"""`tally dashboard` is the server (exec): killing the command, even with SIGKILL, frees the port."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest

from tests.dashboard.server import free_port, wait_healthy
from tests.waiting import wait_for

pytestmark = pytest.mark.slow


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_kill_9_of_tally_dashboard_leaves_no_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "dashboard", str(tmp_path), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        wait_for(lambda: not port_open(port), timeout=60, what="the port to close (a Streamlit server outlived "
                 "`tally dashboard`?)")
    finally:
        if proc.poll() is None:
            proc.kill()
