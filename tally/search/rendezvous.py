"""torch.distributed's rendezvous store on the node's own address, not on every interface.

Ray Train starts a run's process group through torch's env:// rendezvous: rank 0 opens a TCPStore
on MASTER_PORT, and torch 2.14's TCPStore binds all interfaces (`::`), whatever MASTER_ADDR says.
On a local Ray (node address 127.0.0.1: tally.cluster) that was the one port of a search reachable
from the network for the length of every trial; whoever reached it could write the store's keys.

Here rank 0 binds the socket itself, on its node's address (127.0.0.1 on a local Ray, the node's
cluster address on a cluster, where the other ranks connect), and hands the listening file
descriptor to the TCPStore (`master_listen_fd`). Every rank then joins the process group through
that store. What the group computes is unchanged: only who can reach its store.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

_LISTENING: dict[str, int] = {}  # in rank 0's worker: the bound socket's file descriptor, until the store takes it


def bind_store_socket() -> tuple[str, int]:
    """Rank 0: a listening socket on this node's address and a free port; returns (address, port)."""
    address = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    _LISTENING["fd"] = sock.detach()  # the TCPStore owns and closes it
    return address, port


def join_process_group(backend: str, world_rank: int, world_size: int, address: str, port: int,
                       timeout_s: int) -> None:
    """Every rank: the store (rank 0 serves it on the socket bound above), then the process group."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)
    if "nccl" in backend:  # as Ray Train does: fail a timed-out collective instead of hanging
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        store = dist.TCPStore(address, port, world_size, True, timeout=timeout,
                              master_listen_fd=_LISTENING.pop("fd"))
    else:
        store = dist.TCPStore(address, port, world_size, False, timeout=timeout)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class BoundTorchBackend(_TorchBackend):
    """Ray Train's torch backend with the store bound as above (shutdown and the rest unchanged)."""

    def on_start(self, worker_group, backend_config: BoundTorchConfig):
        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) else "gloo"
        address, port = worker_group.execute_single(0, bind_store_socket)
        worker_group.execute(_set_torch_distributed_env_vars)  # RANK, LOCAL_RANK, WORLD_SIZE...
        ray.get([worker_group.execute_single_async(
            i, join_process_group, backend=backend, world_rank=i, world_size=len(worker_group), address=address,
            port=port, timeout_s=backend_config.timeout_s) for i in range(len(worker_group))])


@dataclass
class BoundTorchConfig(TorchConfig):
    """TorchConfig whose process group rendezvous binds the node's address (the module docstring)."""

    @property
    def backend_cls(self):
        return BoundTorchBackend
