"""Waiting in tests: on a condition, with a generous deadline, never a fixed sleep.

A fixed sleep is a guess about how fast a loaded machine is: too short and the test fails for no
reason, too long and every run pays for it. ``wait_for`` returns as soon as the condition holds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    """The first truthy value of ``predicate()``; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:.0f} s for {what}")
        time.sleep(interval)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` now (Linux /proc): take it before killing ``pid``, whose children are
    then re-parented and no longer found this way."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def ray_workers_below(pid: int) -> list[int]:
    """The Ray worker processes (titled ray::...) under ``pid``: the ones that write to a trial's folder."""
    out = []
    for child in descendants(pid):
        try:
            if Path(f"/proc/{child}/cmdline").read_bytes().startswith(b"ray::"):
                out.append(child)
        except OSError:
            continue
    return out
