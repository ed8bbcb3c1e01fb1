"""Who am I? The identity of the component rank that is running.

While a component's ``__init__`` or method runs on a worker,
:func:`get_rank`, :func:`get_world_size` and the environment variables RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
CLUSTER_NAME and WORKER_NAME describe that component rank, as torchrun and
Twinkle's per-actor environment do. Outside a component they read the
process environment (``RANK`` unset means -1, as in Twinkle).
"""

from __future__ import annotations

import contextvars
import os
from dataclasses import dataclass

__all__ = ["Identity", "get_local_rank", "get_rank", "get_world_size", "is_master"]


@dataclass(frozen=True, slots=True)
class Identity:
    """The torchrun-style identity of one component rank."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    group: str
    worker_name: str

    def env(self) -> dict[str, str]:
        """The environment variables this identity sets."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "CLUSTER_NAME": self.group,
            "WORKER_NAME": self.worker_name,
        }


_current: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "twinkle_dask_identity", default=None
)


ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "CLUSTER_NAME", "WORKER_NAME")


def snapshot_env() -> dict[str, str | None]:
    """The identity variables of this process, to hand to :func:`restore_env`."""
    return {k: os.environ.get(k) for k in ENV_VARS}


def restore_env(saved: dict[str, str | None]) -> None:
    """Put back identity variables that in-process component threads rewrote."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        elif os.environ.get(key) != value:
            os.environ[key] = value


def current_identity() -> Identity | None:
    """The identity of the component rank running in this thread, if any."""
    return _current.get()


def enter(identity: Identity) -> None:
    """Make ``identity`` current in this thread and export it to ``os.environ``.

    Component threads call this before running user code. The environment is
    process-wide, so it is rewritten only when another component ran last.
    """
    _current.set(identity)
    env = identity.env()
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.environ.update(env)


def get_rank() -> int:
    """The rank of the running component (``RANK``; -1 when unset)."""
    ident = _current.get()
    if ident is not None:
        return ident.rank
    return int(os.environ.get("RANK", -1))


def get_world_size() -> int:
    """The world size of the running component (``WORLD_SIZE``; 1 when unset)."""
    ident = _current.get()
    if ident is not None:
        return ident.world_size
    return int(os.environ.get("WORLD_SIZE") or 1)


def get_local_rank() -> int:
    """The local rank of the running component (``LOCAL_RANK``; -1 when unset)."""
    ident = _current.get()
    if ident is not None:
        return ident.local_rank
    return int(os.environ.get("LOCAL_RANK", -1))


def is_master() -> bool:
    """True in the driver and on rank 0 of a component."""
    return get_rank() in (-1, 0)
