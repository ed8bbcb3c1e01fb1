"""Components of the multi-host checks (ci/multihost.sh); the workers import them through PYTHONPATH."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import numpy as np

import twinkle_dask as twinkle
from twinkle_dask import DeviceMesh, remote_class, remote_function


@remote_class()
class Node:
    """One rank: says where it runs, produces blocks, summarizes what it is handed."""

    def __init__(self, device_mesh: DeviceMesh = None) -> None:
        self.mesh = device_mesh

    @remote_function(dispatch="all")
    def where(self) -> dict[str, Any]:
        return {"rank": twinkle.get_rank(), "world": twinkle.get_world_size(), "hostname": socket.gethostname(),
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid()}

    @remote_function(dispatch="all", collect="none", lazy_collect=False)
    def import_torch(self) -> None:
        """Import torch here, in the executor: a worker that first meets a tensor in a lazy input imports
        torch while it unpickles it, on its event loop, which answers no ping meanwhile (seconds on a busy
        machine, against the 10 s liveness bound)."""
        import torch  # noqa: F401

    @remote_function(dispatch="all", collect="none", lazy_collect=False)
    def noop(self) -> None:
        return None

    @remote_function(dispatch="slice")
    def scale(self, items: list[int], factor: int) -> list[int]:
        return [factor * i for i in items]

    @remote_function(dispatch="all", collect="flatten")
    def block(self, n_bytes: int) -> list[np.ndarray]:
        """One float64 array of ``n_bytes`` filled with this rank's number (a shard of the flattened result)."""
        return [np.full(n_bytes // 8, float(twinkle.get_rank()))]

    @remote_function(dispatch="all", collect="first")
    def blocks(self, n_bytes: int, count: int) -> list[np.ndarray]:
        """``count`` float64 arrays of ``n_bytes``, array ``i`` filled with ``i``."""
        return [np.full(n_bytes // 8, float(i)) for i in range(count)]

    @remote_function(dispatch="all", collect="flatten")
    def tensors(self, rows: int) -> list[Any]:
        import torch

        rank = twinkle.get_rank()
        return [torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3) * (rank + 1), {"rank": rank}]

    @remote_function(dispatch="slice_dp")
    def summary(self, shards: list[Any]) -> dict[str, Any]:
        """What this rank received, in O(1) per shard (so that timing it times the transfer)."""
        out = []
        for x in shards:
            if isinstance(x, np.ndarray):
                out.append(("ndarray", int(x.size), float(x[0]), float(x[-1])))
            elif isinstance(x, dict):
                out.append(("dict", sorted(x.items())))
            else:
                out.append((type(x).__name__, [float(v) for v in x.flatten().tolist()]))
        return {"rank": twinkle.get_rank(), "shards": out}

    @remote_function(dispatch="all", collect="first")
    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    @remote_function(dispatch="all", collect="sum", lazy_collect=False)
    def count(self) -> int:
        return 1
