"""tests/waiting: the polling helper returns as soon as it can and names what it waited for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.waiting import alive, descendants, wait_for


def test_wait_for_returns_the_first_truthy_value():
    calls = iter([0, None, "ready"])
    assert wait_for(lambda: next(calls), timeout=5, what="x", interval=0) == "ready"


def test_wait_for_names_what_never_came():
    with pytest.raises(AssertionError, match="waited 0 s for the moon"):
        wait_for(lambda: False, timeout=0.05, what="the moon", interval=0.01)


def test_descendants_and_alive_follow_a_process_tree():
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        children = wait_for(lambda: descendants(parent.pid), timeout=60, what="the grandchild")
        assert all(alive(p) for p in children)
    finally:
        for pid in [*descendants(parent.pid)]:
            os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()
    wait_for(lambda: not any(alive(p) for p in children), timeout=60, what="the grandchild to exit")
    assert not alive(parent.pid)
