"""Multiplexed message channels between a caller and a worker.

A call on a component is a small message to each rank's worker, and a
pipeline of calls is many of them. Dask's RPC pool answers one request per
connection at a time and actor calls cost a round trip through an executor;
here one persistent connection per (caller, worker) carries any number of
requests concurrently, each tagged with an id, and whatever is queued while a
write is in flight leaves in the next write. Messages on one channel arrive in
the order they were sent, which is what keeps calls on a component ordered.

Payloads travel pre-serialized (:func:`pack`): the caller serializes arguments
in its own thread, so an unpicklable argument fails at the call site, and the
receiver unpacks each message on its own, so one bad payload fails one call.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

from distributed.comm import CommClosedError, connect
from distributed.protocol.serialize import Serialized, merge_and_deserialize

from ._serde import dumps_serialized
from .exceptions import SerializationError, WorkerLostError

__all__ = ["Channel", "LoopInbox", "ServerEnd", "pack", "unpack"]

logger = logging.getLogger(__name__)

#: The handler name a worker registers for twinkle channels.
HANDLER = "twinkle"


def pack(obj: Any, what: str = "value") -> Serialized:
    """Serialize ``obj`` into frames that travel without being copied again.

    Raises
    ------
    SerializationError
        If ``obj`` cannot be serialized, naming ``what`` it was.
    """
    try:
        return dumps_serialized(obj)
    except Exception as exc:
        raise SerializationError(
            f"cannot serialize {what}: {type(exc).__name__}: {exc}. Everything passed to or "
            f"returned from a remote method must be picklable (cloudpickle); pass plain data, or "
            f"build the object inside the component instead."
        ) from exc


def unpack(obj: Any) -> Any:
    """Inverse of :func:`pack` (plain values pass through)."""
    if isinstance(obj, Serialized):
        return merge_and_deserialize(obj.header, obj.frames)
    return obj


class _Writer:
    """Batches the messages queued while a write is in flight into the next write."""

    def __init__(self) -> None:
        self._queue: list[Any] = []
        self._writing = False
        self.comm: Any = None

    def push(self, msg: Any) -> None:
        self._queue.append(msg)
        if not self._writing and self.comm is not None:
            self._writing = True
            asyncio.get_running_loop().create_task(self._drain())

    def start(self, comm: Any) -> None:
        self.comm = comm
        if self._queue and not self._writing:
            self._writing = True
            asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._queue and self.comm is not None:
                batch, self._queue = self._queue, []
                await self.comm.write(batch)
        except (CommClosedError, OSError) as exc:
            logger.debug("twinkle channel write failed: %s", exc)
            comm, self.comm = self.comm, None
            if comm is not None:
                comm.abort()
        finally:
            self._writing = False


class Channel:
    """A caller's end of one multiplexed connection to a worker.

    Used on its event loop only. :meth:`request` returns a future resolved
    with the worker's reply; if the connection fails, every pending request
    fails with :class:`WorkerLostError` and the channel is marked lost (a new
    one must be made).
    """

    def __init__(self, address: str, connection_args: dict[str, Any], timeout: float = 10.0) -> None:
        self.address = address
        self.connection_args = connection_args
        self.timeout = timeout
        self.lost: BaseException | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._writer = _Writer()
        self._task: asyncio.Task[None] | None = None

    def _ensure_started(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        comm = None
        try:
            comm = await connect(
                self.address, timeout=self.timeout, deserialize=False, **self.connection_args
            )
            await comm.write({"op": HANDLER, "reply": False})
            self._writer.start(comm)
            while True:
                batch = await comm.read()
                for reply in batch:
                    fut = self._pending.pop(reply["i"], None)
                    if fut is not None and not fut.done():
                        fut.set_result(reply)
        except asyncio.CancelledError:
            self._fail(WorkerLostError(self.address, reason="channel closed"))
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._fail(WorkerLostError(self.address, reason=reason))
        finally:
            self._writer.comm = None
            if comm is not None and not comm.closed():
                comm.abort()

    def _fail(self, exc: BaseException) -> None:
        self.lost = exc
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    def request(self, msg: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        """Send ``msg`` and return a future for the reply."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if self.lost is not None:
            fut.set_exception(self.lost)
            return fut
        i = next(self._ids)
        msg["i"] = i
        self._pending[i] = fut
        self._ensure_started()
        self._writer.push(msg)
        return fut

    def send(self, msg: dict[str, Any]) -> None:
        """Send ``msg`` without waiting for a reply."""
        if self.lost is None:
            self._ensure_started()
            self._writer.push(msg)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass


class ServerEnd:
    """A worker's end of a channel: requests in, replies out."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self._writer = _Writer()
        self._writer.start(comm)

    def reply(self, i: int, **fields: Any) -> None:
        fields["i"] = i
        self._writer.push(fields)

    @property
    def closed(self) -> bool:
        return self._writer.comm is None or self.comm.closed()


class LoopInbox:
    """Hands work from any thread to an event loop with at most one wake-up in flight."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: collections.deque[Callable[[], None]] = collections.deque()
        self._scheduled = False
        self._lock = threading.Lock()

    def post(self, fn: Callable[[], None]) -> None:
        self._items.append(fn)
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        with self._lock:
            self._scheduled = False
        items = self._items
        while items:
            fn = items.popleft()
            try:
                fn()
            except Exception:
                logger.exception("twinkle: error in a loop callback")
