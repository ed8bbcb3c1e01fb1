"""Every component call on the Dask dashboard, per rank, with its duration.

Workers record each finished call (component, method, rank, start, stop, ok)
and send them to the scheduler in batches as Dask events on the topic
``twinkle-calls`` (``client.get_events("twinkle-calls")`` reads them back). A
scheduler plugin turns them into Task Stream entries named
``<Component>.<method>``, one row per worker, so group calls show next to (or
instead of) ordinary Dask tasks. Recording costs an append per call and one
message per worker every quarter second; ``dask.config``
``twinkle-dask.record-calls: false`` turns it off.
"""

from __future__ import annotations

import logging
from typing import Any

import dask
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.diagnostics.task_stream import TaskStreamPlugin

__all__ = ["TOPIC", "CallRecorder", "TwinkleSchedulerPlugin", "recording_enabled"]

logger = logging.getLogger(__name__)

TOPIC = "twinkle-calls"
FLUSH_INTERVAL = 0.25


def recording_enabled() -> bool:
    return bool(dask.config.get("twinkle-dask.record-calls", True))


class CallRecorder:
    """Worker side: collects finished calls and ships them as events in batches."""

    def __init__(self, worker: Any, loop: Any) -> None:
        self.worker = worker
        self.loop = loop
        self.records: list[list[Any]] = []
        self._scheduled = False
        self.enabled = recording_enabled()

    def record(self, label: str, method: str, cid: str, call_id: int, rank: int, start: float, stop: float,
               ok: bool) -> None:
        """Loop thread only."""
        if not self.enabled:
            return
        self.records.append([label, method, cid, call_id, rank, start, stop, ok])
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        records, self.records = self.records, []
        if records:
            try:
                self.worker.log_event(TOPIC, {"worker": self.worker.address, "calls": records})
            except Exception:  # the worker is closing
                logger.debug("twinkle: could not send call records", exc_info=True)


class TwinkleSchedulerPlugin(SchedulerPlugin):
    """Scheduler side: turns ``twinkle-calls`` events into Task Stream entries."""

    name = "twinkle-dask"

    def __init__(self) -> None:
        self.scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def _task_stream(self) -> Any:
        plugin = self.scheduler.plugins.get(TaskStreamPlugin.name)
        if plugin is None:
            plugin = TaskStreamPlugin(self.scheduler)
            self.scheduler.add_plugin(plugin)
        return plugin

    def log_event(self, topic: str, msg: Any) -> None:
        if topic != TOPIC or self.scheduler is None or not isinstance(msg, dict):
            return
        stream = self._task_stream()
        worker = msg.get("worker")
        for label, method, cid, call_id, rank, start, stop, ok in msg.get("calls", ()):
            stream.buffer.append({
                "key": f"{label}.{method}-{cid.rsplit('-', 1)[-1]}-{call_id}-rank{rank}",
                "worker": worker,
                "thread": f"{label}-rank{rank}",
                "status": "OK" if ok else "error",
                "startstops": [{"action": "compute", "start": start, "stop": stop}],
                "nbytes": 0,
                "type": "twinkle",
            })
            stream.index += 1
