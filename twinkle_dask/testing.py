"""Helpers for testing components against a real local cluster.

>>> from twinkle_dask.testing import local_session
>>> with local_session(model=4, data=1) as client:  # doctest: +SKIP
...     model = Model(remote_group="model")
...     assert model.forward([1, 2, 3, 4])() == [2, 4, 6, 8]

:func:`local_session` starts the cluster (one worker process per rank, no
dashboard), and shuts it down afterwards. :func:`worker_stats` reads the
per-worker counters (calls handled, results served to other processes).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

from . import runtime
from ._types import tensor_type
from ._wire.protocol import Stats
from .exceptions import NotInitializedError
from .mesh import DeviceGroup
from .session import DaskSession, initialize, shutdown

__all__ = ["assert_same", "local_session", "start_local", "worker_stats"]


def start_local(*groups: DeviceGroup, **cpu_groups: Any) -> Any:
    """``initialize('dask', ...)`` on a local cluster, with CPU groups given as ``name=ranks``.

    Keyword arguments named as ``initialize``'s parameters, or that are not
    ints, are passed to ``initialize``; the dashboard is off unless
    ``dashboard_address`` says otherwise. Returns the ``distributed.Client``.
    """
    own = inspect.signature(initialize).parameters
    options: dict[str, Any] = {k: v for k, v in cpu_groups.items()
                               if k in own or not isinstance(v, int) or isinstance(v, bool)}
    all_groups = list(groups) + [
        DeviceGroup(name=name, ranks=n, device_type="cpu")
        for name, n in cpu_groups.items()
        if name not in options
    ]
    options.setdefault("dashboard_address", None)
    return initialize("dask", groups=all_groups, **options)


@contextlib.contextmanager
def local_session(*groups: DeviceGroup, **cpu_groups: Any) -> Iterator[Any]:
    """Run a local twinkle_dask session for the ``with`` block.

    Parameters
    ----------
    *groups : DeviceGroup
        Groups to start.
    **cpu_groups : int
        Shorthand: ``model=4`` adds ``DeviceGroup(name='model', ranks=4, device_type='cpu')``.
        Keyword arguments that are not ints are passed to ``initialize``.

    Yields
    ------
    distributed.Client
    """
    client = start_local(*groups, **cpu_groups)
    try:
        yield client
    finally:
        shutdown()


def worker_stats() -> dict[str, dict[str, int]]:
    """Per-worker counters of the running session: ``{address: {'fetches': ..., ...}}``."""
    session = runtime.process_session()
    if not isinstance(session, DaskSession) or session.closed:
        raise NotInitializedError("worker_stats() needs a running dask session")
    addresses = sorted({a for p in session.placements.values() for a in p.addresses})
    futures = {a: session.caller.request_threadsafe(a, Stats()) for a in addresses}
    return {a: dict(f.result(30).stats or {}) for a, f in futures.items()}


def assert_same(actual: Any, expected: Any, path: str = "value") -> None:
    """Deep equality for nested lists, tuples, dicts, numpy arrays and torch tensors (types included)."""
    import sys

    import numpy as np

    assert type(actual) is type(expected), f"{path}: type {type(actual).__name__} != {type(expected).__name__}"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(expected, tensor_type() or ()):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
            f"{path}: {actual.dtype}{tuple(actual.shape)} != {expected.dtype}{tuple(expected.shape)}"
        )
        assert torch.equal(actual, expected), f"{path}: {actual} != {expected}"
    elif isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, f"{path}: {actual} != {expected}"
        assert np.array_equal(actual, expected), f"{path}: {actual} != {expected}"
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{path}[{i}]")
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{path}: keys {list(actual)} != {list(expected)}"
        for k in expected:
            assert_same(actual[k], expected[k], f"{path}[{k!r}]")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"
