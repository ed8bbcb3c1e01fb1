"""Every component call on the Dask dashboard, per rank, with its duration.

Workers record each finished call (component, method, rank, start, stop, ok)
and send them to the scheduler in batches as Dask events on the topic
``twinkle-calls``; :func:`call_records` reads them back. A scheduler plugin
turns them into Task Stream entries named ``<Component>.<method>``, one row
per worker, so group calls show next to (or instead of) ordinary Dask tasks.
Recording costs an append per call and one compact message (msgpack bytes)
per worker every half second; ``dask.config`` ``twinkle-dask.record-calls:
false`` turns it off.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

import dask
import msgpack
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.diagnostics.task_stream import TaskStreamPlugin

__all__ = ["TOPIC", "CallRecord", "CallRecorder", "TwinkleSchedulerPlugin", "call_records", "decode",
           "recording_enabled"]

logger = logging.getLogger(__name__)

TOPIC = "twinkle-calls"
FLUSH_INTERVAL = 0.5
#: At most this many calls per event (a worker running thousands of calls a second sends the
#: latest), and the scheduler keeps the last EVENTS_KEPT events of the topic: bounded memory.
MAX_RECORDS = 500
EVENTS_KEPT = 64
TASK_STREAM_KEPT = 10_000


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
        records, self.records = self.records[-MAX_RECORDS:], []
        if records:
            try:
                self.worker.log_event(TOPIC, msgpack.packb([self.worker.address, records]))
            except Exception:  # the worker is closing
                logger.debug("twinkle: could not send call records", exc_info=True)


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One finished call on one rank, as the dashboard shows it."""

    worker: str
    component: str
    method: str
    cid: str
    call_id: int
    rank: int
    start: float
    stop: float
    ok: bool

    @property
    def duration(self) -> float:
        return self.stop - self.start


def decode(msg: bytes) -> list[CallRecord]:
    """The calls of one ``twinkle-calls`` event."""
    worker, records = msgpack.unpackb(msg)
    return [CallRecord(worker, *r) for r in records]


def call_records(client: Any) -> list[CallRecord]:
    """The recent calls the scheduler holds (the last few seconds to minutes of a busy run).

    Examples
    --------
    >>> [r.method for r in call_records(client) if r.component == "Model"]  # doctest: +SKIP
    ['forward', 'forward', 'forward', 'forward']
    """
    return [r for _, msg in client.get_events(TOPIC) if isinstance(msg, bytes) for r in decode(msg)]


class TwinkleSchedulerPlugin(SchedulerPlugin):
    """Scheduler side: turns ``twinkle-calls`` events into Task Stream entries."""

    name = "twinkle-dask"

    def __init__(self) -> None:
        self.scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        try:  # keep fewer events of this busy topic than Dask's default for every topic
            topic = scheduler._broker._topics[TOPIC]
            topic.events = deque(topic.events, maxlen=EVENTS_KEPT)
        except Exception:  # another Dask version: its default bound applies
            logger.debug("twinkle: could not bound the %s event log", TOPIC, exc_info=True)

    def _task_stream(self) -> Any:
        plugin = self.scheduler.plugins.get(TaskStreamPlugin.name)
        if plugin is None:  # no dashboard page made one: keep a shorter history than its default
            plugin = TaskStreamPlugin(self.scheduler, maxlen=TASK_STREAM_KEPT)
            self.scheduler.add_plugin(plugin)
        return plugin

    def log_event(self, topic: str, msg: Any) -> None:
        if topic != TOPIC or self.scheduler is None or not isinstance(msg, bytes):
            return
        stream = self._task_stream()
        for r in decode(msg):
            stream.buffer.append({
                "key": f"{r.component}.{r.method}-{r.cid.rsplit('-', 1)[-1]}-{r.call_id}-rank{r.rank}",
                "worker": r.worker,
                "thread": f"{r.component}-rank{r.rank}",
                "status": "OK" if r.ok else "error",
                "startstops": [{"action": "compute", "start": r.start, "stop": r.stop}],
                "nbytes": 0,
                "type": "twinkle",
            })
            stream.index += 1
