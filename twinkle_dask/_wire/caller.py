"""The process-side engine that issues calls: channels (Dask comms), call ids and releases.

The driver has one :class:`Caller` on the Dask client's event loop; every
worker has one on its own loop (used when a component calls or fetches from
another component). User threads never touch a channel: they hand closures to
the loop through a :class:`LoopInbox`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from .._config import seconds
from ..exceptions import ConfigurationError, WorkerLostError
from .channel import Channel, LoopInbox
from .protocol import Notice, Release, Reply, Request

__all__ = ["Caller"]

logger = logging.getLogger(__name__)


def _block(fut: concurrent.futures.Future[Any], timeout: float | None) -> None:
    done, _ = concurrent.futures.wait([fut], timeout)
    if not done:
        raise concurrent.futures.TimeoutError


class Caller:
    """Issues requests to workers from one process.

    Parameters
    ----------
    loop : asyncio.AbstractEventLoop
        The running event loop the channels live on.
    connection_args : dict
        From the client's or worker's ``Security``.
    in_worker : bool
        True on a worker (calls made there collect eagerly, as in Twinkle).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        connection_args: dict[str, Any],
        *,
        in_worker: bool,
        on_notice: Callable[[Notice], None] | None = None,
    ) -> None:
        self.loop = loop
        self.on_notice = on_notice
        self.connection_args = connection_args
        self.in_worker = in_worker
        self.inbox = LoopInbox(loop)
        self.closed = False
        self._channels: dict[str, Channel] = {}
        self._ids = itertools.count(1)
        self._id_lock = threading.Lock()
        self._releases: dict[str, list[tuple[str, int]]] = defaultdict(list)
        self._release_scheduled = False
        #: Waits for a future to finish (``TimeoutError`` past the timeout). A worker's executor
        #: replaces it so that component code waiting on a call runs nested calls meanwhile.
        self.block: Callable[[concurrent.futures.Future[Any], float | None], None] = _block
        #: Whether a call made from this thread now is made by component code (a worker's
        #: executor): such calls are nested on the receiving worker. None in the driver.
        self.nested: Callable[[], bool] | None = None

    # ------------------------------------------------------------------ ids
    def next_call_id(self) -> int:
        with self._id_lock:
            return next(self._ids)

    # ------------------------------------------------------------------ loop side
    def channel(self, address: str) -> Channel:
        """The channel to ``address`` (loop thread only).

        A lost channel stays lost: requests to a worker that died fail at once
        instead of waiting out a connect timeout. :meth:`joined` clears it when
        a worker joins at that address again (the driver learns that from the
        scheduler). A worker's caller hears nothing of the sort, and the peer
        may only have been cut off for a while (a link down, a stopped
        process) and still be registered: there a request made once the
        channel has been lost for ``twinkle-dask.worker-unresponsive-timeout``
        connects anew (failing, if the peer is still gone, within Dask's
        connect timeout).
        """
        ch = self._channels.get(address)
        if ch is not None and ch.lost is not None and self.in_worker:
            try:
                retry_after = seconds("worker-unresponsive-timeout")
            except ConfigurationError:
                retry_after = 10.0
            if time.monotonic() - ch.lost_at >= retry_after:
                ch = None
        if ch is None:
            ch = Channel(address, self.connection_args, self.on_notice)
            self._channels[address] = ch
        return ch

    def lose(self, address: str, reason: str) -> None:
        """Declare the worker at ``address`` lost (loop thread only).

        Requests waiting on it fail now with :class:`WorkerLostError`, and
        later ones fail at once until a worker joins under that address again
        (:meth:`joined`).
        """
        self.channel(address).lose(reason)

    def joined(self, address: str) -> None:
        """A worker (re)joined the cluster at ``address``: a lost channel there is forgotten (loop thread)."""
        ch = self._channels.get(address)
        if ch is not None and ch.lost is not None:
            del self._channels[address]

    def is_lost(self, address: str) -> bool:
        """Whether the channel to ``address`` broke (read from any thread)."""
        ch = self._channels.get(address)
        return ch is not None and ch.lost is not None

    def lost_reason(self, address: str) -> BaseException | None:
        """Why the channel to ``address`` was lost, or None (read from any thread)."""
        ch = self._channels.get(address)
        return None if ch is None else ch.lost

    def request(self, address: str, msg: Request) -> asyncio.Future[Reply]:
        """Send a request from the loop thread."""
        return self.channel(address).request(msg)

    # ------------------------------------------------------------------ any thread
    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop, soon."""
        if self.closed:
            raise RuntimeError("caller is closed")
        self.inbox.post(fn)

    def request_threadsafe(self, address: str, msg: Request) -> concurrent.futures.Future[Reply]:
        """Send a request from any thread; the returned future is thread-safe."""
        out: concurrent.futures.Future[Reply] = concurrent.futures.Future()

        def send() -> None:
            fut = self.request(address, msg)

            def done(f: asyncio.Future[Reply]) -> None:
                if f.cancelled():
                    out.cancel()
                elif f.exception() is not None:
                    out.set_exception(f.exception())
                else:
                    out.set_result(f.result())

            fut.add_done_callback(done)

        try:
            self.post(send)
        except RuntimeError:
            out.set_exception(WorkerLostError(address, reason="the session is shut down"))
        return out

    def release(self, cid: str, call_id: int, addresses: tuple[str, ...]) -> None:
        """Tell the workers that a kept result is no longer needed (batched)."""
        if self.closed:
            return

        def queue() -> None:
            for address in addresses:
                self._releases[address].append((cid, call_id))
            if not self._release_scheduled:
                self._release_scheduled = True
                self.loop.call_later(0.02, self._flush_releases)

        try:
            self.inbox.post(queue)
        except RuntimeError:  # loop already closed at interpreter exit
            pass

    def _flush_releases(self) -> None:
        self._release_scheduled = False
        pending, self._releases = self._releases, defaultdict(list)
        for address, items in pending.items():
            ch = self._channels.get(address)
            if ch is None or ch.lost is not None:
                continue
            by_cid: dict[str, list[int]] = defaultdict(list)
            for cid, call_id in items:
                by_cid[cid].append(call_id)
            for cid, ids in by_cid.items():
                ch.send(Release(cid, tuple(ids)))

    async def aclose(self) -> None:
        """Close every channel (loop thread)."""
        self.closed = True
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(ch.close() for ch in channels), return_exceptions=True)
