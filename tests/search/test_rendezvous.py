"""The process group's rendezvous store binds the node's address, not every interface (no Ray needed)."""

from __future__ import annotations

import os

import pytest
import torch.distributed as dist

from tally.search import rendezvous
from tests.test_cluster import is_loopback, listening_sockets


@pytest.fixture
def one_rank_group(monkeypatch):
    monkeypatch.setattr(rendezvous.ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    address, port = rendezvous.bind_store_socket()
    yield address, port
    if dist.is_initialized():
        dist.destroy_process_group()


def test_the_store_listens_on_the_node_address_only(one_rank_group):
    address, port = one_rank_group
    rendezvous.join_process_group("gloo", 0, 1, address, port, timeout_s=30)
    assert dist.is_initialized() and dist.get_world_size() == 1
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == (address, str(port))
    mine = {s for s in listening_sockets({os.getpid()}) if s[0].startswith("tcp")}
    assert any(s[2] == port for s in mine), mine  # the store took the bound socket
    assert [s for s in mine if not is_loopback(s[1])] == []  # torch's own TCPStore would add `::`
    dist.barrier()  # the group works through that store
