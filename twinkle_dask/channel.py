"""Multiplexed message channels between a caller and a worker.

A call on a component is a small message to each rank's worker, and a
pipeline of calls is many of them. Dask's RPC answers one request per
connection at a time and its comms measure and frame every message for the
scheduler's sake; here each worker's twinkle extension listens on a port of
its own (found once through a Dask RPC, ``twinkle_port``), and one persistent
connection per (caller, worker) carries any number of requests concurrently,
each tagged with an id. Whatever is queued while a write is in flight leaves
in the next write. Messages on one channel arrive in the order they were sent,
which is what keeps calls on a component ordered.

Payloads travel pre-serialized as :class:`Blob` (pickle protocol 5, tensors
and arrays as out-of-band buffers, see :mod:`twinkle_dask._serde`): the caller
serializes arguments in its own thread, so an unpicklable argument fails at
the call site, and the receiver unpacks each payload on its own, so one bad
payload fails one call. On the wire a batch of messages is one pickle whose
blobs' buffers follow it as raw frames, received straight into their own
buffers (no copy of large tensors on the receiving side).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import pickle
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from distributed.comm.addressing import get_address_host

from ._config import seconds
from ._serde import Blob, dumps_blob
from .exceptions import ConfigurationError, SerializationError, WorkerLostError

__all__ = ["Blob", "Channel", "LoopInbox", "ServerEnd", "pack", "serve", "unpack"]

logger = logging.getLogger(__name__)

#: The Dask RPC handler a worker registers to tell callers its twinkle port.
PORT_HANDLER = "twinkle_port"

_U64 = struct.Struct("!Q")
_SMALL = 64 * 1024
_IN_BAND = 4 * 1024
_STAGING = 256 * 1024
_SOCKET_BUFFER = 4 * 1024 * 1024
_CHUNK = 512 * 1024


def pack(obj: Any, what: str = "value") -> Blob:
    """Serialize ``obj`` into a :class:`Blob`.

    Raises
    ------
    SerializationError
        If ``obj`` cannot be serialized, naming ``what`` it was.
    """
    try:
        return dumps_blob(obj)
    except Exception as exc:
        if isinstance(exc, RecursionError) or "recursion" in str(exc):
            fix = "it is nested too deep for pickle: pass flatter data (or raise sys.setrecursionlimit)."
        else:
            fix = ("everything passed to or returned from a remote method must be picklable (cloudpickle); "
                   "pass plain data, or build the object inside the component instead.")
        raise SerializationError(f"cannot serialize {what}: {type(exc).__name__}: {exc}. Fix: {fix}") from exc


def unpack(obj: Any) -> Any:
    """Inverse of :func:`pack` (plain values pass through)."""
    if isinstance(obj, Blob):
        return obj.load()
    return obj


# --------------------------------------------------------------------------- wire
def _encode(batch: list[dict[str, Any]]) -> list[Any]:
    buffers: list[pickle.PickleBuffer] = []

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        if buf.raw().nbytes <= _IN_BAND:
            return True  # small: stays in the pickle stream
        buffers.append(buf)
        return False

    head = pickle.dumps(batch, protocol=5, buffer_callback=out_of_band)
    frames: list[bytes | memoryview] = [head, *(b.raw() for b in buffers)]
    sizes = b"".join(_U64.pack(len(f) if isinstance(f, bytes) else f.nbytes) for f in frames)
    return [_U64.pack(len(frames)), sizes, *frames]


class _Framed(asyncio.BufferedProtocol):
    """Length-prefixed frames; one callback per batch.

    Small frames are parsed out of a staging buffer (many per read); a large
    frame is received straight into its own buffer, which the unpickled
    tensor or array then uses as its memory.
    """

    def __init__(self, on_batch: Callable[[list[dict[str, Any]]], None], on_lost: Callable[[Any], None],
                 on_made: Callable[[_Framed], None] | None = None) -> None:
        self.on_batch = on_batch
        self.on_lost = on_lost
        self.on_made = on_made
        self.transport: asyncio.Transport | None = None
        self._stage = bytearray(_STAGING)
        self._start = 0
        self._end = 0
        self._count: int | None = None
        self._sizes: list[int] | None = None
        self._frames: list[Any] = []
        self._big: memoryview | None = None
        self._big_have = 0
        self._out: collections.deque[memoryview] = collections.deque()
        self._paused = False
        #: ``time.monotonic()`` when the peer last showed it is alive (sent bytes, or took ours).
        self.heard = time.monotonic()

    # -- connection
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Large tensors cross in fewer, larger chunks (the OS caps these at its own maxima).
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
                except OSError:
                    pass
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        transport.set_write_buffer_limits(high=2 * _CHUNK)
        if self.on_made is not None:
            self.on_made(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.on_lost(exc)

    # -- reading
    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big is not None:
            return self._big[self._big_have :]
        if self._end == len(self._stage):
            if self._start:  # compact what is left of a partly parsed message
                rest = self._end - self._start
                self._stage[:rest] = self._stage[self._start : self._end]
                self._start, self._end = 0, rest
            else:
                self._stage.extend(bytes(len(self._stage)))
        return memoryview(self._stage)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self.heard = time.monotonic()
        if self._big is not None:
            self._big_have += nbytes
            if self._big_have < len(self._big):
                return
            self._frames.append(self._big)
            self._big = None
            self._maybe_done()
        else:
            self._end += nbytes
        self._parse()

    def _available(self) -> int:
        return self._end - self._start

    def _take(self, n: int) -> memoryview:
        view = memoryview(self._stage)[self._start : self._start + n]
        self._start += n
        return view

    def _parse(self) -> None:
        while self._big is None:
            if self._count is None:
                if self._available() < 8:
                    break
                self._count = _U64.unpack_from(self._take(8))[0]
            if self._sizes is None:
                if self._available() < 8 * self._count:
                    break
                raw = self._take(8 * self._count)
                self._sizes = [_U64.unpack_from(raw, 8 * i)[0] for i in range(self._count)]
            if not self._next_frame():
                break
        if self._start == self._end:
            self._start = self._end = 0
            if len(self._stage) > _STAGING:
                self._stage = bytearray(_STAGING)

    def _next_frame(self) -> bool:
        """Read the next frame if it is here; False when more bytes are needed."""
        assert self._sizes is not None
        size = self._sizes[len(self._frames)]
        if size <= _SMALL:
            if self._available() < size:
                return False
            self._frames.append(bytearray(self._take(size)))
            self._maybe_done()
            return True
        # Large frames get their own memory, not zero-filled first (numpy.empty), which the
        # unpickled tensor or array then uses as its storage.
        buf = np.empty(size, dtype=np.uint8)
        view = memoryview(buf)  # type: ignore[arg-type]  # numpy declares the buffer protocol for Python 3.12+ only
        have = min(self._available(), size)
        view[:have] = self._take(have)
        if have == size:
            self._frames.append(view)
            self._maybe_done()
            return True
        self._big, self._big_have = view, have
        return False

    def _maybe_done(self) -> None:
        assert self._sizes is not None
        if len(self._frames) < len(self._sizes):
            return
        frames, self._frames = self._frames, []
        self._count = self._sizes = None
        batch = pickle.loads(frames[0], buffers=frames[1:])
        self.on_batch(batch)

    # -- writing
    def send_batch(self, batch: list[dict[str, Any]]) -> None:
        if self.transport is None:
            raise ConnectionError("the connection is closed")
        parts = _encode(batch)
        if all((len(p) if isinstance(p, bytes) else p.nbytes) <= _SMALL for p in parts):
            self._out.append(memoryview(b"".join(parts)))
        else:
            self._out.extend(memoryview(p).cast("B") for p in parts)
        self._pump()

    def _pump(self) -> None:
        # Feed the transport a chunk at a time: asyncio (before 3.12) keeps unsent data in one
        # bytearray and deletes sent bytes from its front, which is quadratic for large frames.
        transport = self.transport
        while self._out and not self._paused and transport is not None:
            head = self._out[0]
            if head.nbytes <= _CHUNK:
                self._out.popleft()
                transport.write(head)
            else:
                transport.write(head[:_CHUNK])
                self._out[0] = head[_CHUNK:]

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self.heard = time.monotonic()  # the peer is reading what we send
        self._paused = False
        self._pump()

class _Writer:
    """Batches the messages queued while a write is in flight into the next write."""

    def __init__(self) -> None:
        self._queue: list[dict[str, Any]] = []
        self._flush_scheduled = False
        self.proto: _Framed | None = None

    def push(self, msg: dict[str, Any]) -> None:
        self._queue.append(msg)
        if not self._flush_scheduled and self.proto is not None:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def start(self, proto: _Framed) -> None:
        self.proto = proto
        if self._queue and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._queue or self.proto is None:
            return
        batch, self._queue = self._queue, []
        try:
            self.proto.send_batch(batch)
        except Exception as exc:  # a transport closing under us: the reader reports the loss
            logger.debug("twinkle channel write failed: %s", exc)


class Channel:
    """A caller's end of one multiplexed connection to a worker.

    Used on its event loop only. :meth:`request` returns a future resolved
    with the worker's reply; if the connection fails, every pending request
    fails with :class:`WorkerLostError` and the channel stays lost (requests
    to a dead worker fail at once).

    While requests are outstanding the channel watches the worker: when it
    has sent nothing for a while, a ``ping`` goes out (answered on the
    worker's event loop, whatever its components are doing), and a worker
    silent for ``twinkle-dask.worker-unresponsive-timeout`` (dask config, read
    when the watch starts) is declared lost. An idle channel sends nothing.
    """

    def __init__(self, address: str, connection_args: dict[str, Any], timeout: float = 10.0,
                 on_notice: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.address = address
        self.connection_args = connection_args
        self.timeout = timeout
        self.on_notice = on_notice
        self.lost: BaseException | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._writer = _Writer()
        self._task: asyncio.Task[None] | None = None
        self._proto: _Framed | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._limit = 0.0  # seconds of silence that make the worker lost (0: not watched)
        self._since = 0.0  # when the current watch started (monotonic)
        self._due = 0.0  # when the next check was due (monotonic)
        self._ping: int | None = None  # id of the ping in flight

    def _ensure_started(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        from distributed.core import rpc

        try:
            async with rpc(self.address, timeout=self.timeout, connection_args=self.connection_args) as r:
                port = await r.twinkle_port()
            host = get_address_host(self.address)
            ssl = self.connection_args.get("ssl_context")
            loop = asyncio.get_running_loop()
            _, proto = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Framed(self._on_batch, self._on_lost), host, port, ssl=ssl,
                    server_hostname=host if ssl is not None else None,
                ),
                self.timeout,
            )
            self._proto = proto
            self._writer.start(proto)
        except asyncio.CancelledError:
            self._fail(WorkerLostError(self.address, reason="channel closed"))
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._fail(WorkerLostError(self.address, reason=reason))

    def _on_batch(self, batch: list[dict[str, Any]]) -> None:
        for reply in batch:
            if "i" not in reply:  # a notice (component output, metrics), not a reply
                if self.on_notice is not None:
                    try:
                        self.on_notice(reply)
                    except Exception:
                        logger.exception("twinkle: could not handle a notice from %s", self.address)
                continue
            fut = self._pending.pop(reply["i"], None)
            if fut is not None and not fut.done():
                fut.set_result(reply)

    def _on_lost(self, exc: Any) -> None:
        reason = f"{type(exc).__name__}: {exc}" if exc else "the connection closed"
        self._fail(WorkerLostError(self.address, reason=reason))

    def _fail(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._writer.proto = None
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
        if self._watch is None:
            try:
                self._limit = seconds("worker-unresponsive-timeout")  # read when a watch starts
            except ConfigurationError as exc:
                fut.set_exception(exc)
                return fut
        i = next(self._ids)
        msg["i"] = i
        self._pending[i] = fut
        self._ensure_started()
        self._writer.push(msg)
        if self._watch is None:
            self._start_watch()
        return fut

    def lose(self, reason: str) -> None:
        """Declare the worker lost: fail every pending request and close the connection."""
        self._fail(WorkerLostError(self.address, reason=reason))
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.abort()

    # -- liveness
    def _start_watch(self) -> None:
        if self._limit <= 0 or self.lost is not None:
            return
        self._since = time.monotonic()
        self._schedule_check()

    def _schedule_check(self) -> None:
        step = min(1.0, self._limit / 4)
        self._due = time.monotonic() + step
        self._watch = asyncio.get_running_loop().call_later(step, self._check)

    def _check(self) -> None:
        self._watch = None
        if self.lost is not None or not any(i != self._ping for i in self._pending):
            return  # idle (a ping alone does not keep the watch going)
        try:
            self._limit = seconds("worker-unresponsive-timeout")  # a changed setting applies at once
        except ConfigurationError:
            pass  # the next request reports it to its caller
        if self._limit <= 0:
            return
        now = time.monotonic()
        step = min(1.0, self._limit / 4)
        if now - self._due > step:
            # This process's own loop was held up: the silence is not the worker's doing.
            self._since = now
        heard = max(self._since, self._proto.heard if self._proto is not None else 0.0)
        silent = now - heard
        if silent >= self._limit:
            logger.warning("twinkle: worker %s did not answer for %.1f s; declaring it lost", self.address, silent)
            self.lose(f"did not answer for {self._limit:g} s")
            return
        if silent >= step and self._ping is None:
            self._send_ping()
        self._schedule_check()

    def _send_ping(self) -> None:
        i = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[i] = fut
        self._ping = i

        def done(f: asyncio.Future[dict[str, Any]]) -> None:
            if self._ping == i:
                self._ping = None
            if not f.cancelled():
                f.exception()  # a lost channel fails the ping too: nobody waits on it

        fut.add_done_callback(done)
        self._writer.push({"t": "ping", "i": i})

    def send(self, msg: dict[str, Any]) -> None:
        """Send ``msg`` without waiting for a reply."""
        if self.lost is None:
            self._ensure_started()
            self._writer.push(msg)

    async def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._fail(WorkerLostError(self.address, reason="channel closed"))


class ServerEnd:
    """A worker's end of a channel: requests in, replies out."""

    def __init__(self) -> None:
        self._writer = _Writer()
        self.proto: _Framed | None = None
        self.closed = False

    def attach(self, proto: _Framed) -> None:
        self.proto = proto
        self._writer.start(proto)

    def reply(self, i: int, **fields: Any) -> None:
        if self.closed:
            return
        fields["i"] = i
        self._writer.push(fields)

    def notify(self, **fields: Any) -> None:
        """Send a one-way notice (no request id) to the caller."""
        if not self.closed:
            self._writer.push(fields)


async def serve(
    host: str,
    on_message: Callable[[dict[str, Any], ServerEnd], None],
    on_close: Callable[[ServerEnd], None],
    ssl: Any = None,
) -> asyncio.Server:
    """Listen for channels on ``host`` (a free port); ``on_message`` gets each request."""

    def factory() -> _Framed:
        end = ServerEnd()

        def on_batch(batch: list[dict[str, Any]]) -> None:
            for msg in batch:
                on_message(msg, end)

        def on_lost(exc: Any) -> None:
            end.closed = True
            on_close(end)

        return _Framed(on_batch, on_lost, on_made=end.attach)

    return await asyncio.get_running_loop().create_server(factory, host, 0, ssl=ssl)


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
