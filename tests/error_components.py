"""Components whose methods fail, or return what the driver cannot load (for tests/test_errors.py)."""

from __future__ import annotations

import os
import sys
import tempfile
import time

import twinkle_dask as twinkle
from twinkle_dask import remote_class, remote_function


class ShardError(Exception):
    """An exception whose ``__init__`` takes other arguments than it gives ``Exception``."""

    def __init__(self, shard: int, reason: str) -> None:
        super().__init__(f"shard {shard} is broken: {reason}")
        self.shard = shard
        self.reason = reason


class Abort(BaseException):
    """A user's BaseException (not an Exception)."""


def _refuse(reason: str) -> None:
    raise ValueError(f"refusing to load: {reason}")


class LoadsBadly:
    """Pickles fine on the worker; loading it raises."""

    def __reduce__(self):
        return _refuse, ("made on the worker",)


def _worker_only_module(rank: int):
    """A module importable on this worker only (its folder is on this process's sys.path)."""
    name = f"worker_only_{os.getpid()}_{rank}"
    if name not in sys.modules:
        folder = tempfile.mkdtemp(prefix="twinkle-worker-only-")
        with open(os.path.join(folder, f"{name}.py"), "w") as f:
            f.write("class Thing:\n    pass\n\n\nclass ThingError(Exception):\n    pass\n")
        sys.path.insert(0, folder)
    return __import__(name)


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@remote_class()
class Failer:
    """Methods that fail on chosen ranks, with chosen exception types."""

    @remote_function(dispatch="all", lazy_collect=False)
    def fail(self, failing: list, reverse: bool = False) -> int:
        rank = twinkle.get_rank()
        if rank in failing:
            if reverse:  # higher ranks fail first
                time.sleep(0.1 * (3 - rank))
            raise ValueError(f"rank {rank} failed")
        return rank

    @remote_function(dispatch="all", sync=True)
    def fail_sync(self, failing: list) -> int:
        rank = twinkle.get_rank()
        if rank in failing:
            raise ValueError(f"rank {rank} failed")
        return rank

    @remote_function(dispatch="all", lazy_collect=False)
    def fail_lazy_lower(self, slow_rank: int, failing_rank: int, delay: float) -> int:
        rank = twinkle.get_rank()
        if rank == slow_rank:
            time.sleep(delay)
        if rank == failing_rank:
            raise ValueError(f"rank {rank} failed")
        return rank

    @remote_function(execute="first")
    def raise_kind(self, kind: str):
        if kind == "shard":
            raise ShardError(3, "checksum mismatch")
        if kind == "abort":
            raise Abort("stop the run")
        if kind == "keyboard":
            raise KeyboardInterrupt("interrupted in a component")
        if kind == "exit":
            raise SystemExit(3)
        if kind == "worker_only":
            raise _worker_only_module(twinkle.get_rank()).ThingError("from a worker-only module")
        raise AssertionError(kind)

    @remote_function(execute="first")
    def ping(self) -> int:
        return os.getpid()

    @remote_function(execute="first")
    def result_kind(self, kind: str, size: int = 1):
        if kind == "loads_badly":
            return [LoadsBadly()] * size
        if kind == "worker_only":
            return [_worker_only_module(twinkle.get_rank()).Thing()] * size
        if kind == "nested":
            return nested(size)
        raise AssertionError(kind)

    @remote_function(execute="first")
    def echo(self, value):
        return value


@remote_class(execute="first")
class NoLenLoader:
    """A loader whose length is unknown: ``__len__`` raises."""

    def __init__(self, n_batches: int = 3) -> None:
        self.n_batches = n_batches

    def __len__(self) -> int:
        raise TypeError("this loader has no length")

    @remote_function(collect="first")
    def __iter__(self):
        for i in range(self.n_batches):
            yield [i]
