"""Kept results as Dask data: the tasks behind ``LazyResult.futures()`` and a lazy result handed to Dask.

A rank's future is an ordinary Dask task pinned to the rank's worker that
reads the kept result in place (no copy, no serialization): from then on the
value is in the worker's Dask data store under the future's key, and Dask
moves it worker to worker like any other task output. The collected value
is one more task, placed by the scheduler, that applies the call's collect
strategy to the rank futures it reads.
"""

from __future__ import annotations

from typing import Any

from distributed import get_worker

from ..collect import MISSING, collect
from ..exceptions import ComponentClosedError
from ..lazy import LazySource

__all__ = ["collect_ranks", "kept_result"]


async def kept_result(cid: str, call_id: int, rank: int) -> Any:
    """Dask task (on the rank's worker): the kept result ``call_id`` of rank ``rank`` of component ``cid``.

    Waits for the call if it has not finished yet; raises the rank's error if it failed.
    """
    worker = get_worker()
    ext = worker.extensions.get("twinkle")
    if ext is None:
        raise ComponentClosedError(
            f"worker {worker.address} runs no twinkle extension: rank {rank} of component {cid}, which "
            f"produced this result, is not there (its worker was lost and Dask reran the task elsewhere)"
        )
    return await ext.read_kept(cid, call_id, rank)


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
