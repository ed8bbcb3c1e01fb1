"""Every component call on the Dask dashboard, per rank, with its duration.

Workers record each finished call (component, method, rank, start, stop, ok)
and send them to the scheduler in batches as Dask events on the topic
``twinkle-calls``; :func:`call_records` reads them back. A scheduler plugin
turns them into Task Stream entries named ``<Component>.<method>``, one row
per rank, so component calls show next to ordinary Dask tasks on the
dashboard's Task Stream and in ``distributed.performance_report``.
Recording costs an append per call and one compact message (msgpack bytes)
per worker every half second; ``dask.config`` ``twinkle-dask.record-calls:
false`` turns it off.

Only public Dask interfaces carry the records:

* worker to scheduler: ``Worker.log_event`` (documented, batched on the
  worker's scheduler stream), read back with ``Client.get_events``. The
  scheduler keeps the last ``distributed.admin.low-level-log-length`` events
  of the topic (Dask's bound for every topic, 1000 by default), each with at
  most :data:`MAX_RECORDS` calls of about 25 bytes: about 12 MB at most.
* on the scheduler: :class:`TwinkleSchedulerPlugin`, a ``SchedulerPlugin``
  installed with ``Client.register_plugin``, receives each event through the
  documented ``SchedulerPlugin.log_event`` hook.
* into the Task Stream: the dashboard page, ``Client.get_task_stream`` and
  ``performance_report`` all read Dask's ``TaskStreamPlugin``; the plugin
  feeds it through that plugin's public ``transition`` hook, with the
  keywords a finished task's ``processing -> memory`` (or ``-> erred``)
  transition carries. Nothing writes its buffer or counter.

What is not documented, and why it is still used: ``TaskStreamPlugin`` is
documented as a plugin the scheduler calls, not as one anybody else calls;
handing it a transition relies on it recording every ``processing ->
memory/erred`` transition it is given, which is all its ``transition`` does.
And ``Scheduler.plugins``, the scheduler's public (not underscored) name ->
plugin mapping without a documented accessor, is read to find the
``TaskStreamPlugin`` a dashboard page may already have made, exactly as
Dask's own dashboard components and ``Scheduler.get_task_stream`` find it (a
new one is added with ``Scheduler.add_plugin``). Every Task Stream view reads
that one instance, and there is no other way to reach it. The alternatives
are worse: a real Dask task per call would put the scheduler on every call's
path, and a stream handler of our own (``Scheduler.stream_handlers``) is just
as undocumented and would bypass the event log that ``Client.get_events``,
``Client.subscribe_topic`` and :func:`call_records` read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

import dask
import msgpack
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.diagnostics.task_stream import TaskStreamPlugin

__all__ = ["TOPIC", "CallRecord", "CallRecorder", "TwinkleSchedulerPlugin", "call_records", "decode",
           "encode", "recording_enabled", "task_key"]

logger = logging.getLogger(__name__)

TOPIC = "twinkle-calls"
FLUSH_INTERVAL = 0.5
#: At most this many calls per event: a worker running thousands of calls a second sends the latest.
MAX_RECORDS = 500
#: The Task Stream history kept when no dashboard page made the Task Stream plugin first
#: (Dask's own default keeps 100,000 tasks).
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
                self.worker.log_event(TOPIC, encode(self.worker.address, records))
            except Exception:  # the worker is closing
                logger.debug("twinkle: could not send call records", exc_info=True)


def encode(worker: str, records: list[list[Any]]) -> bytes:
    """One ``twinkle-calls`` event: each (component, method, component id) once, then one short row per call.

    ``records`` are ``[component, method, cid, call_id, rank, start, stop, ok]``
    lists; a row is ``[index of (component, method, cid), call_id, rank, start,
    stop, ok]`` (about 25 bytes, where repeating the names took about 60).
    """
    names: dict[tuple[str, str, str], int] = {}
    rows = [[names.setdefault((label, method, cid), len(names)), call_id, rank, start, stop, ok]
            for label, method, cid, call_id, rank, start, stop, ok in records]
    return msgpack.packb([worker, list(names), rows])


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
    worker, names, rows = msgpack.unpackb(msg)
    return [CallRecord(worker, *names[i], *r) for i, *r in rows]


def call_records(client: Any) -> list[CallRecord]:
    """The recent calls the scheduler holds (the last few seconds to minutes of a busy run).

    Examples
    --------
    >>> [r.method for r in call_records(client) if r.component == "Model"]  # doctest: +SKIP
    ['forward', 'forward', 'forward', 'forward']
    """
    return [r for _, msg in client.get_events(TOPIC) if isinstance(msg, bytes) for r in decode(msg)]


def task_key(record: CallRecord) -> str:
    """The Task Stream key of one call: ``<Component>.<method>-<component id>-<call id>-rank<r>``.

    Dask names a Task Stream bar by the key's prefix (``key_split``), so the
    bars read ``<Component>.<method>``; the rest keeps every key unique.
    """
    return f"{record.component}.{record.method}-{record.cid.rsplit('-', 1)[-1]}-{record.call_id}-rank{record.rank}"


class TwinkleSchedulerPlugin(SchedulerPlugin):
    """Scheduler side: turns ``twinkle-calls`` events into Task Stream entries.

    Each call becomes what a finished task's transition hands the Task Stream
    plugin: the worker, a thread named ``<Component>-rank<r>`` (one row per
    rank), one ``compute`` interval, ``status`` ``'OK'`` or ``'error'`` (a
    failed call is drawn black, as a failed task is) and ``type``
    ``'twinkle'``, which tells component calls from tasks in
    ``Client.get_task_stream()``.
    """

    name = "twinkle-dask"

    def __init__(self) -> None:
        self.scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def _task_stream(self) -> TaskStreamPlugin:
        plugin = self.scheduler.plugins.get(TaskStreamPlugin.name)
        if plugin is None:  # no dashboard page made one: keep a shorter history than its default
            plugin = TaskStreamPlugin(self.scheduler, maxlen=TASK_STREAM_KEPT)
            self.scheduler.add_plugin(plugin, name=TaskStreamPlugin.name)
        return cast(TaskStreamPlugin, plugin)

    def log_event(self, topic: str, msg: Any) -> None:
        if topic != TOPIC or self.scheduler is None or not isinstance(msg, bytes):
            return
        stream = self._task_stream()
        for r in decode(msg):
            stream.transition(
                task_key(r), "processing", "memory" if r.ok else "erred",
                worker=r.worker,
                thread=f"{r.component}-rank{r.rank}",
                status="OK" if r.ok else "error",
                startstops=[{"action": "compute", "start": r.start, "stop": r.stop}],
                nbytes=0,
                type="twinkle",
                stimulus_id=f"twinkle-call-{r.call_id}",
            )
