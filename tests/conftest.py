"""Shared fixtures: an isolated data cache per test session, one local Ray per session."""

from __future__ import annotations

import os

import pytest


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

    os.environ["RAY_AUTH_MODE"] = "disabled"
    connect(None, concurrency=2)
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
