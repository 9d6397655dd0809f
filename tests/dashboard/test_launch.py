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


# ---------------------------------------------------------------- closed by default
def test_a_remote_address_needs_allow_remote(tmp_path, capsys, monkeypatch):
    """--address beyond loopback is refused in one line (exit 2, before any server starts)."""
    import os

    from tally.cli import main

    def no_exec(*args):
        raise AssertionError("the dashboard server was started on 0.0.0.0")

    monkeypatch.setattr(os, "execv", no_exec)
    assert main(["dashboard", str(tmp_path), "--address", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--allow-remote" in err[0] and "SSH tunnel" in err[0]


def test_allow_remote_warns_in_one_line_and_loopback_is_quiet():
    from tally.dashboard.launch import check_address

    for address in ("127.0.0.1", "localhost", "::1", "127.0.1.1"):
        assert check_address(address, allow_remote=False) is None
    warning = check_address("0.0.0.0", allow_remote=True)
    assert warning.startswith("warning:") and "\n" not in warning and "0.0.0.0" in warning


def test_the_server_hides_streamlits_deploy_button():
    """client.toolbarMode=viewer hides the developer toolbar (Deploy, rerun, clear cache); the option
    exists under that name in the installed Streamlit (the browser test checks the page)."""
    from streamlit import config

    from tally.dashboard.launch import command

    argv = command("results")
    option = argv[argv.index("--client.toolbarMode") + 1]
    assert option == "viewer" and "--" in argv and argv.index("--client.toolbarMode") < argv.index("--")
    assert "client.toolbarMode" in config._config_options_template
