"""Shared fixtures: an isolated data cache per test session, one local Ray per session, and a guard
that fails any test which connects (or looks up a name) outside this machine."""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest

# Subprocesses the tests start (tally CLI, Ray's processes) inherit these; a user's explicit value wins.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray's usage-stats report
os.environ.setdefault("OUTDATED_IGNORE", "1")  # `outdated`'s warnings (tally.data.iwildcam stops the check)


# ---------------------------------------------------------------- network guard
class OutsideConnection(ConnectionRefusedError):
    """A test tried to reach beyond loopback: refused before any packet left."""


def _is_local(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode()
    host = str(host).split("%")[0]  # an IPv6 scope
    if host in ("", "localhost", "localhost.localdomain"):  # "": this host (INADDR_ANY)
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a name: only this machine's own (resolved from /etc/hosts, not a DNS server)
        return host == socket.gethostname()
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


class NetworkGuard:
    """Patches the socket module of this process: a connect, connect_ex, sendto or name lookup that
    leaves the machine raises OutsideConnection and is recorded, so the test fails even when the
    caller (a library thread) swallows the error."""

    def __init__(self):
        self.refused: list[str] = []

    def check(self, what: str, host) -> None:
        if not _is_local(host):
            self.refused.append(f"{what} {host!r}")
            raise OutsideConnection(f"network guard: {what} {host!r} is outside this machine")

    def install(self, monkeypatch) -> None:
        guard = self

        def host_of(family, address):
            if family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
                return address[0]
            return None  # AF_UNIX and the like stay on the machine

        real_connect, real_connect_ex, real_sendto = (socket.socket.connect, socket.socket.connect_ex,
                                                      socket.socket.sendto)
        real_getaddrinfo = socket.getaddrinfo

        def connect(self, address):
            guard.check("connect to", host_of(self.family, address))
            return real_connect(self, address)

        def connect_ex(self, address):
            guard.check("connect to", host_of(self.family, address))
            return real_connect_ex(self, address)

        def sendto(self, data, *args):
            guard.check("sendto", host_of(self.family, args[-1]))
            return real_sendto(self, data, *args)

        def getaddrinfo(host, *args, **kwargs):
            guard.check("name lookup of", host)
            return real_getaddrinfo(host, *args, **kwargs)

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
        monkeypatch.setattr(socket.socket, "sendto", sendto)
        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture(autouse=True)
def network_guard(monkeypatch):
    """Every test runs behind the guard (the moto S3 server and Ray listen on 127.0.0.1)."""
    guard = NetworkGuard()
    guard.install(monkeypatch)
    yield guard
    if guard.refused:
        pytest.fail("this test tried to reach outside the machine: " + "; ".join(guard.refused), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """The embedded dataset is materialised once per session into a private cache."""
    path = tmp_path_factory.mktemp("tally-cache")
    old = os.environ.get("TALLY_CACHE")
    os.environ["TALLY_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("TALLY_CACHE", None)
    else:
        os.environ["TALLY_CACHE"] = old


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for every search test (starting one costs seconds).

    The dashboard process is on: Train V2's PlacementGroupCleaner asks the State API whether a
    stopped trial's controller is alive; without it early-stopped trials leak their workers.
    """
    import ray

    from tally.search import connect

    connect(None, concurrency=2)  # loopback only, Ray's token auth on (tally.cluster)
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP's spinning threads slow tiny nets 10x."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
