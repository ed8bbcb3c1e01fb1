"""What components say: their prints and their metrics, delivered to the driver.

Inside a component, ``print`` (and anything else written to ``sys.stdout`` or
``sys.stderr`` from the component's thread) reaches the driver, or the
notebook, line by line with the component and rank in front::

    (Model rank 2) epoch 3: loss 0.41

:func:`report` sends structured metrics instead; the driver keeps them for
:func:`get_metrics`. ``dask.config`` ``twinkle-dask.forward-output: false``
leaves worker output where the worker writes it.
"""

from __future__ import annotations

import io
import sys
import threading
import time
from collections import deque
from typing import Any, Protocol

import dask

from . import runtime

__all__ = ["get_metrics", "report"]

_local = threading.local()


class Reporter(Protocol):
    """What a component thread reports through (its rank host)."""

    def output(self, stream: str, text: str) -> None: ...

    def metrics(self, values: dict[str, Any]) -> None: ...


def bind(reporter: Reporter | None) -> None:
    """Route this thread's output and metrics to ``reporter`` (component threads)."""
    _local.reporter = reporter


def _reporter() -> Reporter | None:
    return getattr(_local, "reporter", None)


class RoutedStream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of a worker: component threads' text goes to their reporter."""

    def __init__(self, original: Any, name: str) -> None:
        self._original = original
        self._name = name

    def write(self, text: str) -> int:
        reporter = _reporter()
        if reporter is None:
            return int(self._original.write(text) or 0)
        reporter.output(self._name, text)
        return len(text)

    def flush(self) -> None:
        self._original.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return int(self._original.fileno())

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self._original, "encoding", "utf-8"))

    def writable(self) -> bool:
        return True


def route_process_streams() -> None:
    """Install :class:`RoutedStream` as this process's stdout and stderr (once)."""
    if not dask.config.get("twinkle-dask.forward-output", True):
        return
    if not isinstance(sys.stdout, RoutedStream):
        sys.stdout = RoutedStream(sys.stdout, "stdout")
    if not isinstance(sys.stderr, RoutedStream):
        sys.stderr = RoutedStream(sys.stderr, "stderr")


def show_output(prefix: str, stream: str, text: str) -> None:
    """Print forwarded component output here, each line prefixed with its origin."""
    target = sys.stderr if stream == "stderr" else sys.stdout
    lines = text.splitlines(keepends=True)
    target.write("".join(f"({prefix}) {line}" for line in lines))
    target.flush()


class MetricsLog:
    """The driver's record of reported metrics (the most recent 100,000)."""

    def __init__(self, maxlen: int = 100_000) -> None:
        self.records: deque[dict[str, Any]] = deque(maxlen=maxlen)

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)


def report(**values: Any) -> None:
    """Send metrics to the driver, tagged with the component, rank and time.

    Inside a component the record travels to the driver; in the driver it is
    recorded directly. Values should be small and picklable (numbers, strings).

    Examples
    --------
    >>> twinkle_dask.report(step=3, loss=0.41)  # doctest: +SKIP
    >>> twinkle_dask.get_metrics()[-1]  # doctest: +SKIP
    {'component': 'Model', 'rank': 2, 'time': 1764000000.0, 'step': 3, 'loss': 0.41}
    """
    reporter = _reporter()
    if reporter is not None:
        reporter.metrics(dict(values))
        return
    session = runtime.process_session()
    log = getattr(session, "metrics_log", None)
    if log is not None:
        log.add({"component": None, "rank": None, "time": time.time(), **values})


def get_metrics(component: str | None = None) -> list[dict[str, Any]]:
    """Metrics reported so far in this session (optionally of one component class)."""
    session = runtime.process_session()
    log = getattr(session, "metrics_log", None)
    if log is None:
        return []
    return [r for r in log.records if component is None or r.get("component") == component]
