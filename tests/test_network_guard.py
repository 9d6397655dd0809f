"""The suite-wide network guard (tests/conftest.py): a test that reaches outside the machine fails,
and the guard refuses before anything is sent. 192.0.2.0/24 is TEST-NET-1: never routed."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


@pytest.mark.parametrize("reach", [
    lambda: socket.create_connection(("192.0.2.1", 80), timeout=30),
    lambda: socket.socket().connect_ex(("192.0.2.1", 443)),
    lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("192.0.2.1", 53)),
    lambda: socket.socket(socket.AF_INET6).connect(("2001:db8::1", 80)),
    lambda: socket.getaddrinfo("pypi.invalid", 443),
    lambda: urllib.request.urlopen("http://192.0.2.1/simple/", timeout=30),  # raises URLError(guard's error)
], ids=["create_connection", "connect_ex", "udp-sendto", "ipv6", "name-lookup", "urllib"])
def test_an_outside_connection_is_refused_and_fails_the_test(network_guard, reach):
    started = time.monotonic()
    with pytest.raises(OSError):
        reach()
    # refused at once, not after a connect attempt: an attempt would wait for the 30 s timeout
    assert time.monotonic() - started < 10
    assert network_guard.refused, "the refusal must be recorded, so a swallowed error still fails the test"
    network_guard.refused.clear()  # this test made the call on purpose


INNER = """
import socket, threading

def test_phones_home():
    def call():
        try:
            socket.create_connection(("192.0.2.1", 80), timeout=30)
        except OSError:
            pass  # a library that hides the failure
    thread = threading.Thread(target=call)
    thread.start()
    thread.join()

def test_stays_home():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        socket.create_connection(server.getsockname(), timeout=5).close()
"""


def test_a_refusal_swallowed_by_a_library_still_fails_the_test(tmp_path):
    """A background thread (wilds' version check, say) catches the error: the test fails anyway."""
    (tmp_path / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    (tmp_path / "test_inner.py").write_text(INNER)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith(("ERROR", "FAILED"))]
    assert len(errors) == 1 and "test_phones_home" in errors[0], proc.stdout[-3000:]
    assert "192.0.2.1" in proc.stdout


def test_loopback_and_this_machine_pass(network_guard):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        socket.create_connection(server.getsockname(), timeout=5).close()
        socket.create_connection(("localhost", server.getsockname()[1]), timeout=5).close()
    assert network_guard.refused == []
