"""The worker side's entry points: ``dask worker --preload twinkle_dask.worker`` and :class:`TwinklePlugin`.

Both install a :class:`~twinkle_dask._worker.extension.TwinkleWorker`
extension on the worker: the Dask handler that serves calls, the executor
that runs component code, the results the worker holds.
"""

from __future__ import annotations

from typing import Any

from distributed import WorkerPlugin

from ._worker.extension import TwinkleWorker

__all__ = ["TwinklePlugin", "TwinkleWorker", "dask_setup", "install"]


def install(worker: Any) -> TwinkleWorker:
    """Install the extension on ``worker`` (idempotent)."""
    existing = worker.extensions.get(TwinkleWorker.name)
    if isinstance(existing, TwinkleWorker):
        return existing
    return TwinkleWorker(worker)


def dask_setup(worker: Any) -> None:
    """Preload hook: ``dask worker --preload twinkle_dask._worker.extension``."""
    install(worker)


class TwinklePlugin(WorkerPlugin):
    """Installs the twinkle extension on every current and future worker of a cluster."""

    name = "twinkle-dask"

    def setup(self, worker: Any) -> None:
        install(worker)
