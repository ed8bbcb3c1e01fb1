"""Kept results as Dask data: the tasks behind a lazy result handed to Dask.

A rank's future (``LazyResult.futures()``) is no task: its key is the one the
kept result already has in the rank's worker's data store, registered with
the scheduler when asked (see :mod:`twinkle_dask.futures`). What needs a
task is a failed rank (:func:`rank_failed`, whose future raises the rank's
error) and the collected value, placed by the scheduler: :func:`collect_ranks`
applies the call's collect strategy to the rank futures it reads, or, where
no rank futures were made, :func:`collect_lazy` fetches the ranks' results
worker to worker as a component's lazy input is.
"""

from __future__ import annotations

from typing import Any

from distributed import get_worker

from ..collect import MISSING, collect
from ..exceptions import ComponentClosedError
from ..lazy import LazySource

__all__ = ["collect_lazy", "collect_ranks", "rank_failed"]


def rank_failed(error: BaseException) -> Any:
    """Dask task: raise the error of a rank whose call failed (its future in ``LazyResult.futures()``)."""
    raise error


async def collect_lazy(src: LazySource) -> Any:
    """Dask task (on any worker): the collected value of ``src``, its ranks' results fetched worker to worker."""
    worker = get_worker()
    ext = worker.extensions.get("twinkle")
    if ext is None:
        raise ComponentClosedError(
            f"worker {worker.address} runs no twinkle extension, so it cannot fetch the result of {src.label}; "
            f"start every worker with the twinkle_dask preload or plugin"
        )
    return await ext.resolver().whole(src)


def collect_ranks(src: LazySource, needed: list[int], *values: Any) -> Any:
    """Dask task: apply ``src``'s collect strategy to the per-rank results it reads."""
    results: list[Any] = [MISSING] * len(src.addresses)
    for i, v in zip(needed, values):
        results[i] = v
    try:
        return collect(src.collect, results, src.mesh)
    except Exception as exc:
        exc.add_note(f"while collecting the result of {src.label}")
        raise
