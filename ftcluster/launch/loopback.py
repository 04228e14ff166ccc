"""Torch process groups that listen on 127.0.0.1 only, for Ray clusters that live on this machine.

Ray Train's own torch backend rendezvous through a TCPStore on rank 0, and torch binds that
store's server socket to every interface (``*:PORT``), unauthenticated, for the whole run. When
every Ray node is on loopback (the embedded local Ray, or test clusters of several raylets on
127.0.0.1) this backend creates the store on a socket it bound to 127.0.0.1 itself and keeps
gloo / NCCL on the loopback interface. Clusters of real machines keep Ray's backend: their
workers must reach rank 0 over the network (see the README's port table).

This module uses Ray Train's backend plug-in interface (``BackendConfig`` / ``Backend``, a
developer API): ``tests/test_ray.py``'s listening-socket test fails when a Ray upgrade changes it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass

from ray.train.backend import Backend, BackendConfig
from ray.train.torch import TorchConfig

LOOPBACK = "127.0.0.1"
SHUTDOWN_TIMEOUT_S = 30
_listening: socket.socket | None = None  # rank 0's bound store socket, between on_start's two calls


def cluster_on_loopback() -> bool:
    """True when every live Ray node of the connected cluster has the address 127.0.0.1."""
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    return bool(nodes) and all(node["NodeManagerAddress"] == LOOPBACK for node in nodes)


def _bind_store_socket() -> int:
    """On rank 0: a listening socket on 127.0.0.1 for the TCPStore; returns its port."""
    global _listening
    _listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    _listening.bind((LOOPBACK, 0))
    _listening.listen(128)
    return _listening.getsockname()[1]


def _join_group(backend: str, world_rank: int, world_size: int, port: int, timeout_s: int) -> None:
    """On every worker: the environment torch launchers set, then the process group over the loopback store."""
    import ray.train
    import torch.distributed as dist

    context = ray.train.get_context()
    os.environ.update({
        "RANK": str(world_rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(context.get_local_rank()),
        "LOCAL_WORLD_SIZE": str(context.get_local_world_size()), "NODE_RANK": str(context.get_node_rank()),
        "MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(port),
        # gloo and NCCL pick the interface for their own sockets from these.
        "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo",
    })
    timeout = datetime.timedelta(seconds=timeout_s)
    if world_rank == 0:
        assert _listening is not None, "rank 0 binds its store socket in on_start before joining"
        store = dist.TCPStore(LOOPBACK, port, world_size, True, timeout, master_listen_fd=_listening.fileno())
    else:
        store = dist.TCPStore(LOOPBACK, port, world_size, False, timeout)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


def _leave_group() -> None:
    import torch.distributed as dist

    global _listening
    if dist.is_initialized():
        dist.destroy_process_group()
    if _listening is not None:
        _listening.close()
        _listening = None


class _LoopbackTorchBackend(Backend):
    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group, backend_config: BackendConfig) -> None:
        import ray

        assert isinstance(backend_config, LoopbackTorchConfig)  # Ray passes the config whose backend_cls this is

        uses_gpu = worker_group.get_resources_per_worker().get("GPU", 0) > 0
        backend = backend_config.backend or ("nccl" if uses_gpu else "gloo")
        port = worker_group.execute_single(0, _bind_store_socket)
        size = len(worker_group)
        ray.get([worker_group.execute_single_async(rank, _join_group, backend=backend, world_rank=rank, world_size=size,
                                                   port=port, timeout_s=backend_config.timeout_s)
                 for rank in range(size)])

    def on_shutdown(self, worker_group, backend_config) -> None:
        """Leave the group on every worker, but never wait on a hung or frozen one for long."""
        import ray

        with contextlib.suppress(ray.exceptions.GetTimeoutError):  # a stuck worker: Ray kills the group's processes next
            ray.get(worker_group.execute_async(_leave_group), timeout=SHUTDOWN_TIMEOUT_S)


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """TorchConfig whose process group rendezvous and traffic stay on 127.0.0.1."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


def torch_config(timeout_s: int) -> TorchConfig:
    """The process-group set-up for the connected Ray cluster: loopback-only when it all lives here."""
    return LoopbackTorchConfig(timeout_s=timeout_s) if cluster_on_loopback() else TorchConfig(timeout_s=timeout_s)
