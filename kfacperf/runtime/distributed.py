"""Process-group set-up from ``torchrun``-style environment variables.

``torchrun`` (and :mod:`helpers.distributed`) export ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.  :func:`init_distributed` reads them,
picks the backend (NCCL when CUDA is available, gloo otherwise) and sets a finite timeout, so
that a rank that dies turns into an error on every surviving rank instead of a hang (and
:mod:`kfacperf.runtime.watchdog` ends a rank that makes no progress where a backend's own
timeout does not fire).

**Where the store listens.**  When ``MASTER_ADDR`` is a loopback address (a run on one
machine), rank 0 binds the rendezvous store to exactly that address, so nothing outside the
machine can reach it (torch's own TCPStore listens on every interface).  Under torchrun's
agent store, or with a routable ``MASTER_ADDR`` (several machines), the store is torch's:
reachable by anyone on that network for the length of the run, so run multi-node jobs on a
trusted network only.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 60.0
"""Seconds a collective may wait for a missing peer before every rank raises."""

_REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True, kw_only=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def _env_int(env: Mapping[str, str], key: str) -> int:
    value = env.get(key, "")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def default_backend() -> str:
    """``nccl`` when a CUDA device is usable, ``gloo`` otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(
    *,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
) -> DistInfo:
    """Initialise the default process group from torchrun's environment variables.

    If the default group already exists (e.g. the caller initialised it), it is reused and
    only described.  ``timeout_s`` bounds every collective: with gloo a missing peer raises
    after it; with NCCL the watchdog aborts the communicator after it (asynchronous error
    handling is switched on, so the error surfaces instead of a hang).
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
    env = os.environ if env is None else env
    if dist.is_initialized():
        return describe()
    missing = [k for k in _REQUIRED if k not in env]
    if missing:
        raise RuntimeError(
            "cannot initialise torch.distributed: environment variable(s) "
            f"{', '.join(missing)} not set; launch with torchrun (or kfacperf profile --nproc N)"
        )
    rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid RANK={rank} for WORLD_SIZE={world}")
    backend = backend or default_backend()
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"unknown backend {backend!r}; use 'gloo' or 'nccl'")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend 'nccl' requested but CUDA is not available; use 'gloo'")
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        local = _env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        torch.cuda.set_device(local % torch.cuda.device_count())
    timeout = datetime.timedelta(seconds=timeout_s)
    store = loopback_store(env, rank=rank, world=world, timeout=timeout)
    if store is not None:
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world,
                                timeout=timeout)
    else:
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
            rank=rank,
            world_size=world,
            timeout=timeout,
        )
    return describe()


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_store(env: Mapping[str, str], *, rank: int, world: int,
                   timeout: datetime.timedelta) -> dist.TCPStore | None:
    """The rendezvous store bound to the loopback ``MASTER_ADDR`` only (rank 0 serves it),
    or None where torch's own store is used (torchrun's agent store, or another address)."""
    host = env["MASTER_ADDR"]
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or not is_loopback(host):
        return None
    port = _env_int(env, "MASTER_PORT")
    if rank != 0:
        return dist.TCPStore(host, port, world, False, timeout=timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1" if host == "localhost" else host, port))
        sock.listen(max(128, world))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port} for the rendezvous store "
                           f"({exc.strerror or exc})") from None
    # the store owns the socket from here (detach: Python must not close it)
    return dist.TCPStore(host, port, world, True, timeout=timeout, wait_for_workers=False,
                         master_listen_fd=sock.detach())


def init_local_group(backend: str, *, rank: int, world: int, port: int,
                     timeout_s: float) -> None:
    """Join a process group of ranks on this machine alone (the communication benchmark's),
    exposed to nothing outside it: the store on loopback (:func:`loopback_store`) and gloo's
    and NCCL's sockets on the loopback interface unless the user chose one."""
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    timeout = datetime.timedelta(seconds=timeout_s)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    store = loopback_store(env, rank=rank, world=world, timeout=timeout)
    assert store is not None  # a loopback address, and not torchrun's agent store
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def describe() -> DistInfo:
    """The :class:`DistInfo` of this process (a world of one when not initialised)."""
    if not dist.is_initialized():
        return DistInfo(
            rank=0, world_size=1, local_rank=0, backend="none",
            device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
        )
    backend = str(dist.get_backend())
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return DistInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local,
        backend=backend, device=device,
    )


def is_distributed() -> bool:
    """True when a default process group with more than one rank exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shutdown() -> None:
    """Destroy the default process group if there is one."""
    if dist.is_initialized():
        dist.destroy_process_group()
