"""Multiplexed message channels between a caller and a worker, on Dask comms.

A call on a component is a small message to each rank's worker, and a
pipeline of calls is many of them. Dask's RPC answers one request per
connection at a time; here a caller opens one persistent Dask comm per
worker (``distributed.comm.connect``: any Dask transport, ``tcp``, ``tls``,
``inproc``, ``ucx``, with the process's ``connection_args`` and Dask's
connect timeout) whose first message names the ``twinkle_stream`` handler of
the worker's twinkle extension; from then on both ends exchange batches of
messages on it, any number of requests concurrently, each tagged with an id.
Whatever is queued while a write is in flight leaves in the next write.
Messages on one channel arrive in the order they were sent, which is what
keeps calls on a component ordered.

Payloads travel pre-serialized as :class:`Blob` (pickle protocol 5, tensors
and arrays as out-of-band buffers, see :mod:`twinkle_dask._wire.serde`): the caller
serializes arguments in its own thread, so an unpicklable argument fails at
the call site, and the receiver unpacks each payload on its own, so one bad
payload fails one call. On the wire a batch of messages is one pickle whose
blobs' buffers follow it as the comm's own frames
(``distributed.protocol.Pickled``), which Dask's TCP comm receives straight
into their own buffers (no copy of large tensors on the receiving side).
On a UCX comm whose two ends both keep CUDA tensors in device memory
(agreed when the channel opens), blobs' device frames are frames of the
message too, sent and received device to device.
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
from typing import Any, cast

import dask.config
import numpy as np
from dask.utils import parse_timedelta
from distributed.comm.core import Comm, CommClosedError, connect
from distributed.comm.inproc import InProc
from distributed.comm.tcp import TCP
from distributed.protocol.serialize import Pickled

from .._config import seconds
from ..exceptions import ConfigurationError, SerializationError, WorkerLostError
from .protocol import Notice, Ping, Reply, Request
from .serde import Blob, device_frame_of, device_frame_sink, device_frames_enabled, dumps_blob

__all__ = ["Blob", "Channel", "LoopInbox", "ServerEnd", "can_move_device", "connect_timeout", "pack", "unpack"]

logger = logging.getLogger(__name__)

#: What a batch holds: ``(request_id, message)``; request id 0 wants no reply.
Entry = tuple[int, Request | Reply | Notice]

#: The Dask handler a worker's twinkle extension registers for channels.
STREAM_HANDLER = "twinkle_stream"

#: Batches travel as ``Pickled`` (our own pickle and frames): no other serializer applies.
_SERIALIZERS = ("pickle",)
_IN_BAND = 4 * 1024
_SOCKET_BUFFER = 4 * 1024 * 1024


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
def _dump_batch(batch: list[Entry], copy: bool = False, device: bool = False) -> tuple[bytes, list[Any], int]:
    """One batch as one pickle and its large buffers (blobs' tensors and arrays), out of band.

    ``copy``: the buffers are copied (in-process comms hand over the object itself, and the
    receiver must not share memory with the sender's values). ``device``: the comm moves
    device memory, so blobs' device frames (CUDA tensors) become frames as they are, in
    device memory; otherwise they are copied to host here. Returns the pickle, the frames
    and how many of them are device frames.
    """
    if device:
        return _dump_batch_device(batch, copy)
    buffers: list[Any] = []

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes <= _IN_BAND:
            return True  # small: stays in the pickle stream
        buffers.append(bytearray(raw) if copy else raw)
        return False

    return pickle.dumps(batch, protocol=5, buffer_callback=out_of_band), buffers, 0


def _dump_batch_device(batch: list[Entry], copy: bool) -> tuple[bytes, list[Any], int]:
    """:func:`_dump_batch` for a comm that moves device memory.

    Each device frame is one of the pickle's out-of-band buffers, in the
    order the pickle uses them: Dask's comm unpickles the batch itself with
    the message's frames as the buffers, so the receiving unpickler hands
    each device frame, as the comm received it (device memory), to the blob
    that owns it.
    """
    buffers: list[Any] = []
    count = 0

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        nonlocal count
        frame = device_frame_of(buf)
        if frame is not None:
            buffers.append(frame)
            count += 1
            return False
        raw = buf.raw()
        if raw.nbytes <= _IN_BAND:
            return True
        buffers.append(bytearray(raw) if copy else raw)
        return False

    with device_frame_sink():
        head = pickle.dumps(batch, protocol=5, buffer_callback=out_of_band)
    return head, buffers, count


def _encode(batch: list[Entry], copy: bool, device: bool = False) -> Pickled:
    """One batch for a Dask comm: the pickle in the header, large buffers as the comm's own frames.

    With ``device`` (a comm that moves device memory, both ends able to use it),
    blobs' device frames are frames too, and the header counts them (``device-frames``).
    """
    head, buffers, count = _dump_batch(batch, copy, device)
    if count:
        return Pickled({"pickled-obj": head, "device-frames": count}, buffers)
    return Pickled({"pickled-obj": head}, buffers)


def _decode(msg: Any) -> list[Entry]:
    """A batch as read from a comm (in-process comms hand over the :class:`Pickled` unread)."""
    if isinstance(msg, Pickled):
        batch = pickle.loads(msg.header["pickled-obj"], buffers=msg.frames)
    else:
        batch = msg
    if not isinstance(batch, list):
        raise TypeError(f"a twinkle stream carries lists of messages, not {type(batch).__name__}")
    return cast("list[Entry]", batch)


def _holds_device_frames(batch: list[Entry]) -> bool:
    """Whether a payload in ``batch`` keeps tensors in device memory (only where device frames are on)."""
    if not device_frames_enabled():
        return False
    for _, msg in batch:
        for field in ("value", "payload", "remote_dispatch"):
            blob = getattr(msg, field, None)
            if isinstance(blob, Blob) and blob.device_frames:
                return True
    return False


def connect_timeout() -> float:
    """``distributed.comm.timeouts.connect`` in seconds (read at call time)."""
    return float(parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="seconds"))


class _Batching:
    """What both kinds of stream share: messages pushed during one turn of the event loop
    (or while a write is in flight) leave together in the next write."""

    def __init__(self, comm: Comm, on_lost: Callable[[BaseException | None], None]) -> None:
        self.comm = comm
        self.on_lost = on_lost
        self.closed = False
        self._queue: list[Entry] = []
        self._flush_scheduled = False

    def _can_write(self) -> bool:
        raise NotImplementedError

    def _write(self, batch: list[Entry]) -> None:
        raise NotImplementedError

    def push(self, msg: Entry) -> None:
        if self.closed:
            return
        self._queue.append(msg)
        if not self._flush_scheduled and self._can_write():
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.closed or not self._queue or not self._can_write():
            return
        batch, self._queue = self._queue, []
        self._write(batch)

    def _flush_now(self) -> None:
        """Before closing: what is queued goes out now."""
        if self._flush_scheduled:
            self._flush()


class _Stream(_Batching):
    """Both ends' use of one Dask comm: batched writes, and a reader that hands over each batch.

    ``heard`` is when something last arrived from the peer. ``device``: the
    comm moves device memory and both ends use it (agreed when the channel
    opened): blobs' device frames travel as they are.
    """

    def __init__(self, comm: Comm, on_lost: Callable[[BaseException | None], None], device: bool = False) -> None:
        super().__init__(comm, on_lost)
        self.heard = time.monotonic()
        self.device = device
        # Our own payloads unpickle without copies: never hand them to an offload thread.
        comm.allow_offload = False
        self._copy = isinstance(comm, InProc)
        sock = getattr(getattr(comm, "stream", None), "socket", None)
        if isinstance(sock, socket.socket):
            # Large tensors cross in fewer, larger chunks (the OS caps these at its own maxima).
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
                except OSError:
                    pass
        self._writing: asyncio.Task[None] | None = None  # a write that had to wait

    def _can_write(self) -> bool:
        return self._writing is None

    def _write(self, batch: list[Entry]) -> None:
        """Write ``batch``.

        Dask's TCP and in-process comms finish a write without waiting (the
        bytes go to the stream's buffer), so the write runs right here; a comm
        whose write does wait is finished by a task, and what is queued
        meanwhile leaves after it, in order.
        """
        if not self.device and _holds_device_frames(batch):
            # Device frames to copy to host for this comm: done in a thread, the loop stays free.
            self._writing = asyncio.get_running_loop().create_task(self._write_staged(batch))
            return
        coro = self.comm.write(_encode(batch, self._copy, self.device), serializers=_SERIALIZERS, on_error="raise")
        try:
            waiting = coro.send(None)
        except StopIteration:
            return
        except Exception as exc:  # the comm failed under us
            self._write_failed(exc)
            return
        self._writing = asyncio.get_running_loop().create_task(self._finish(coro, waiting))

    def _write_failed(self, exc: BaseException) -> None:
        logger.debug("twinkle stream write to %s failed: %s", self.comm.peer_address, exc)
        self.lost(exc)

    async def _write_staged(self, batch: list[Entry]) -> None:
        """Write ``batch`` after copying its blobs' device frames to host in a thread (what is
        queued meanwhile leaves after it, in order)."""
        try:
            msg = await asyncio.get_running_loop().run_in_executor(None, _encode, batch, self._copy, False)
        except Exception as exc:
            self._writing = None
            self._write_failed(exc)
            return
        await self._finish(self.comm.write(msg, serializers=_SERIALIZERS, on_error="raise"), None)

    async def _finish(self, coro: Any, waiting: Any) -> None:
        """Drive a comm write to its end (``waiting``: what it waits on, None to start it), then let
        what was queued meanwhile leave, in order."""
        try:
            while True:
                if waiting is None:
                    await asyncio.sleep(0)
                else:
                    try:
                        await waiting
                    except BaseException:
                        pass  # the write sees the outcome itself when resumed
                waiting = coro.send(None)
        except StopIteration:
            pass
        except asyncio.CancelledError:
            coro.close()
            raise
        except Exception as exc:
            self._write_failed(exc)
        finally:
            self._writing = None
        if self._queue and not self.closed:
            self._flush()

    async def read_loop(self, on_batch: Callable[[list[Entry]], None]) -> None:
        """Hand each batch that arrives to ``on_batch`` until the comm closes."""
        comm = self.comm
        exc: BaseException | None = None
        try:
            while True:
                msg = await comm.read(deserializers=_SERIALIZERS)
                self.heard = time.monotonic()
                on_batch(_decode(msg))
        except asyncio.CancelledError:
            raise
        except CommClosedError as e:
            exc = e if not self.closed else None
        except Exception as e:
            logger.debug("twinkle stream read from %s failed: %s", comm.peer_address, e)
            exc = e
        finally:
            self.lost(exc)

    def lost(self, exc: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self._writing is not None:
            self._writing.cancel()
        self.comm.abort()
        self.on_lost(exc)

    async def close(self) -> None:
        """Close after what is queued has been written."""
        if self.closed:
            return
        self._flush_now()
        self.closed = True
        if self._writing is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._writing), 1.0)
            except (asyncio.CancelledError, Exception):
                self._writing.cancel()
        try:
            await self.comm.close()
        except Exception:
            self.comm.abort()


# --------------------------------------------------------------------------- TCP sockets taken over
_U64 = struct.Struct("!Q")
_SMALL = 64 * 1024
_STAGING = 256 * 1024
_CHUNK = 512 * 1024


def _frame(batch: list[Entry]) -> list[Any]:
    """One batch as length-prefixed frames: count, sizes, the pickle, its large buffers."""
    head, buffers, _ = _dump_batch(batch)  # device frames are copied to host: TCP moves host memory
    frames: list[Any] = [head, *buffers]
    sizes = b"".join(_U64.pack(len(f) if isinstance(f, bytes) else f.nbytes) for f in frames)
    return [_U64.pack(len(frames)), sizes, *frames]


def can_take_socket(comm: Comm) -> bool:
    """Whether ``comm`` is a plain TCP comm whose socket the channel may run on itself.

    TLS, in-process and UCX comms keep Dask's own reads and writes. Setting
    ``twinkle-dask.comm.take-tcp-socket: false`` keeps them for TCP too.
    """
    if type(comm) is not TCP or not bool(dask.config.get("twinkle-dask.comm.take-tcp-socket", True)):
        return False
    stream = getattr(comm, "stream", None)
    return stream is not None and isinstance(getattr(stream, "socket", None), socket.socket)


def take_socket(comm: TCP) -> socket.socket:
    """Take the socket of a TCP comm away from Tornado (the connection stays open).

    Only between messages: the comm has read exactly what was sent so far
    (Dask's TCP comm reads into exact-size buffers, nothing ahead), which the
    caller makes sure of with the handshake in :class:`Channel`.
    """
    stream = comm.stream
    if stream is None or stream._read_buffer_size:  # noqa: SLF001  # nothing may be buffered ahead
        raise CommClosedError("cannot take over the connection: bytes are buffered ahead")
    sock = stream.socket.dup()
    comm.abort()  # closes Tornado's descriptor; the duplicate keeps the connection
    sock.setblocking(False)
    return sock


class _Framed(asyncio.BufferedProtocol):
    """Length-prefixed frames on a socket; one callback per batch.

    Small frames are parsed out of a staging buffer (many per read); a large
    frame is received straight into its own buffer, which the unpickled
    tensor or array then uses as its memory.
    """

    def __init__(self, on_batch: Callable[[list[Entry]], None],
                 on_lost: Callable[[BaseException | None], None]) -> None:
        self.on_batch = on_batch
        self.on_lost = on_lost
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
        self.heard = time.monotonic()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=2 * _CHUNK)

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

    def _take(self, n: int) -> memoryview:
        view = memoryview(self._stage)[self._start : self._start + n]
        self._start += n
        return view

    def _parse(self) -> None:
        while self._big is None:
            if self._count is None:
                if self._end - self._start < 8:
                    break
                self._count = _U64.unpack_from(self._take(8))[0]
            if self._sizes is None:
                if self._end - self._start < 8 * self._count:
                    break
                raw = self._take(8 * self._count)
                self._sizes = [_U64.unpack_from(raw, 8 * i)[0] for i in range(self._count)]
            if not self._next_frame(self._sizes):
                break
        if self._start == self._end:
            self._start = self._end = 0
            if len(self._stage) > _STAGING:
                self._stage = bytearray(_STAGING)

    def _next_frame(self, sizes: list[int]) -> bool:
        """Read the next frame if it is here; False when more bytes are needed."""
        size = sizes[len(self._frames)]
        available = self._end - self._start
        if size <= _SMALL:
            if available < size:
                return False
            self._frames.append(bytearray(self._take(size)))
            self._maybe_done()
            return True
        # Large frames get their own memory, not zero-filled first (numpy.empty), which the
        # unpickled tensor or array then uses as its storage.
        view = memoryview(np.empty(size, dtype=np.uint8))  # type: ignore[arg-type]  # numpy declares the buffer protocol for 3.12+ only
        have = min(available, size)
        view[:have] = self._take(have)
        if have == size:
            self._frames.append(view)
            self._maybe_done()
            return True
        self._big, self._big_have = view, have
        return False

    def _maybe_done(self) -> None:
        if self._sizes is None or len(self._frames) < len(self._sizes):
            return
        frames, self._frames = self._frames, []
        self._count = self._sizes = None
        self.on_batch(_decode(pickle.loads(frames[0], buffers=frames[1:])))

    # -- writing
    def send_batch(self, batch: list[Entry]) -> None:
        if self.transport is None:
            raise ConnectionError("the connection is closed")
        parts = _frame(batch)
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


class _SocketStream(_Batching):
    """The same interface as :class:`_Stream`, on a TCP comm's socket taken from Tornado.

    Why: Dask's TCP comm re-registers its socket with the event loop on every
    read and write and frames every message for the scheduler's sake; on this
    machine that made a message cost the driver about 0.2 ms of CPU against
    0.1 ms here, a 4-rank call 1.65 ms instead of 1.0 and a training step
    13.7 ms instead of 8.9. The connection is still Dask's (its address,
    connect timeout, keep-alive settings and the worker's Dask handler); only
    the framing after the handshake is this module's.
    """

    def __init__(self, comm: Comm, on_lost: Callable[[BaseException | None], None]) -> None:
        super().__init__(comm, on_lost)
        self._sock = take_socket(cast("TCP", comm))
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
            except OSError:
                pass
        self._proto: _Framed | None = None
        self._done: asyncio.Future[BaseException | None] | None = None

    @property
    def heard(self) -> float:
        return self._proto.heard if self._proto is not None else time.monotonic()

    def _can_write(self) -> bool:
        return self._proto is not None

    def _write(self, batch: list[Entry]) -> None:
        assert self._proto is not None
        try:
            self._proto.send_batch(batch)
        except Exception as exc:  # a transport closing under us
            logger.debug("twinkle stream write failed: %s", exc)
            self.lost(exc)

    async def read_loop(self, on_batch: Callable[[list[Entry]], None]) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[BaseException | None] = loop.create_future()
        self._done = done

        def on_lost(exc: BaseException | None) -> None:
            if not done.done():
                done.set_result(exc)

        try:
            _, proto = await loop.create_connection(lambda: _Framed(on_batch, on_lost), sock=self._sock)
        except Exception as exc:
            self._sock.close()
            self.lost(exc)
            return
        self._proto = proto
        if self.closed:  # closed while the transport was being made
            cast("asyncio.Transport", proto.transport).abort()
        elif self._queue:
            self._flush()
        try:
            why = await done
        except asyncio.CancelledError:
            self.lost(None)
            raise
        self.lost(why if why is not None else (None if self.closed else CommClosedError("connection closed")))

    def lost(self, exc: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        proto = self._proto
        if proto is not None and proto.transport is not None:
            proto.transport.abort()
        elif proto is None:
            self._sock.close()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        self.on_lost(exc)

    async def close(self) -> None:
        """Close after what is queued has been written."""
        if self.closed:
            return
        self._flush_now()
        proto = self._proto
        self.closed = True
        if proto is not None and proto.transport is not None:
            proto.transport.close()
        elif proto is None:
            self._sock.close()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)



def can_move_device(comm: Comm) -> bool:
    """Whether this end can send and receive device memory on ``comm``.

    True for a UCX comm (``distributed.comm.ucx``, ``distributed_ucxx``) in a
    process with device frames on (see
    :func:`twinkle_dask._wire.serde.set_device_frames`); a channel uses device
    frames when both of its ends can.
    """
    if not device_frames_enabled():
        return False
    module = type(comm).__module__
    return module == "distributed.comm.ucx" or module.split(".")[0] == "distributed_ucxx"


def open_stream(comm: Comm, on_lost: Callable[[BaseException | None], None],
                take: bool, device: bool = False) -> _Stream | _SocketStream:
    """The stream a channel runs on ``comm``: its socket taken over (``take``), or the comm itself
    (``device``: blobs' device frames travel as they are)."""
    if take:
        return _SocketStream(comm, on_lost)
    return _Stream(comm, on_lost, device)

class Channel:
    """A caller's end of one persistent Dask comm to a worker.

    Used on its event loop only. :meth:`request` returns a future resolved
    with the worker's reply; if the comm fails, every pending request fails
    with :class:`WorkerLostError` and the channel stays lost (requests to a
    dead worker fail at once).

    While requests are outstanding the channel watches the worker: when it
    has sent nothing for a while, a ``ping`` goes out (answered on the
    worker's event loop, whatever its components are doing), and a worker
    silent for ``twinkle-dask.worker-unresponsive-timeout`` (dask config, read
    when the watch starts) is declared lost. An idle channel sends nothing.
    """

    def __init__(self, address: str, connection_args: dict[str, Any],
                 on_notice: Callable[[Notice], None] | None = None) -> None:
        self.address = address
        self.connection_args = connection_args
        self.on_notice = on_notice
        self.lost: BaseException | None = None
        #: When the channel was lost (``time.monotonic()``).
        self.lost_at = 0.0
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._queue: list[Entry] = []  # messages sent before the comm is up
        self._task: asyncio.Task[None] | None = None
        self._stream: _Stream | _SocketStream | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._limit = 0.0  # seconds of silence that make the worker lost (0: not watched)
        self._since = 0.0  # when the current watch started (monotonic)
        self._due = 0.0  # when the next check was due (monotonic)
        self._ping: int | None = None  # id of the ping in flight

    @property
    def transport(self) -> str | None:
        """``"socket"`` (a TCP comm's socket run by the channel), ``"comm"`` (Dask's reads and writes), or None."""
        if self._stream is None:
            return None
        return "socket" if isinstance(self._stream, _SocketStream) else "comm"

    @property
    def moves_device(self) -> bool:
        """Whether CUDA tensors kept in device memory travel on this channel as they are (both ends on UCX)."""
        return isinstance(self._stream, _Stream) and self._stream.device

    @property
    def comm(self) -> Comm | None:
        """The Dask comm to the worker (None until connected or once lost)."""
        return self._stream.comm if self._stream is not None else None

    def _ensure_started(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            comm = await connect(self.address, timeout=connect_timeout(), **self.connection_args)
            take = can_take_socket(comm)
            device = can_move_device(comm)
            hello: dict[str, Any] = {"op": STREAM_HANDLER, "reply": False, "take": take}
            if device:
                hello["device"] = True
            await comm.write(hello, serializers=_SERIALIZERS, on_error="raise")
            if take or device:
                # The worker answers before taking its end: nothing follows on either side until
                # both run the socket themselves (and both know whether device frames go).
                answer = await comm.read(deserializers=_SERIALIZERS)
                take, device = bool(answer.get("take")), bool(answer.get("device"))
        except asyncio.CancelledError:
            self._fail(WorkerLostError(self.address, reason="channel closed"))
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._fail(WorkerLostError(self.address, reason=reason))
            return
        if self.lost is not None:  # lost (or closed) while connecting
            comm.abort()
            return
        try:
            stream = self._stream = open_stream(comm, self._on_lost, take, device)
        except Exception as exc:
            self._fail(WorkerLostError(self.address, reason=f"{type(exc).__name__}: {exc}"))
            return
        queued, self._queue = self._queue, []
        for msg in queued:
            stream.push(msg)
        await stream.read_loop(self._on_batch)

    def _push(self, msg: Entry) -> None:
        if self._stream is not None:
            self._stream.push(msg)
        else:
            self._queue.append(msg)
            self._ensure_started()

    def _on_batch(self, batch: list[Entry]) -> None:
        for i, reply in batch:
            if not i:  # a notice (component output, metrics), not a reply
                if self.on_notice is not None:
                    try:
                        self.on_notice(cast("Notice", reply))
                    except Exception:
                        logger.exception("twinkle: could not handle a notice from %s", self.address)
                continue
            fut = self._pending.pop(i, None)
            if fut is not None and not fut.done():
                fut.set_result(cast("Reply", reply))

    def _on_lost(self, exc: BaseException | None) -> None:
        reason = f"{type(exc).__name__}: {exc}" if exc else "the connection closed"
        self._fail(WorkerLostError(self.address, reason=reason))

    def _fail(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
            self.lost_at = time.monotonic()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._queue = []
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    def request(self, msg: Request) -> asyncio.Future[Reply]:
        """Send ``msg`` and return a future for the reply."""
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
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
        self._pending[i] = fut
        self._push((i, msg))
        if self._watch is None:
            self._start_watch()
        return fut

    def lose(self, reason: str) -> None:
        """Declare the worker lost: fail every pending request and close the comm."""
        self._fail(WorkerLostError(self.address, reason=reason))
        if self._stream is not None:
            self._stream.lost(None)

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
        heard = max(self._since, self._stream.heard if self._stream is not None else 0.0)
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
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[i] = fut
        self._ping = i

        def done(f: asyncio.Future[Reply]) -> None:
            if self._ping == i:
                self._ping = None
            if not f.cancelled():
                f.exception()  # a lost channel fails the ping too: nobody waits on it

        fut.add_done_callback(done)
        self._push((i, Ping()))

    def send(self, msg: Request) -> None:
        """Send ``msg`` without waiting for a reply."""
        if self.lost is None:
            self._push((0, msg))

    async def close(self) -> None:
        self._fail(WorkerLostError(self.address, reason="channel closed"))
        if self._stream is not None:
            await self._stream.close()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass


class ServerEnd:
    """A worker's end of a channel: requests in, replies and notices out."""

    def __init__(self, comm: Comm, take: bool = False, device: bool = False) -> None:
        self._stream = open_stream(comm, self._on_lost, take, device)

    async def close(self) -> None:
        await self._stream.close()

    @property
    def closed(self) -> bool:
        return self._stream.closed

    def _on_lost(self, exc: BaseException | None) -> None:
        pass  # the serving loop returns; the worker frees what this caller built

    def reply(self, i: int, reply: Reply) -> None:
        self._stream.push((i, reply))

    def notify(self, notice: Notice) -> None:
        """Send a one-way notice (request id 0) to the caller."""
        self._stream.push((0, notice))

    async def serve(self, on_message: Callable[[int, Request, ServerEnd], None]) -> None:
        """Hand every request that arrives to ``on_message`` until the caller goes away."""

        def on_batch(batch: list[Entry]) -> None:
            for i, msg in batch:
                on_message(i, cast("Request", msg), self)

        await self._stream.read_loop(on_batch)


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
