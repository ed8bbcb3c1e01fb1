"""LazyResult: the value of a remote call that stays on the workers until needed.

Its per-rank results become ``distributed.Future`` s only when asked
(:meth:`LazyResult.futures`, or the LazyResult handed to Dask). The future
of a rank is the kept result itself, not a copy: its key is the key under
which the result already sits in the rank's worker's Dask data store
(:func:`~twinkle_dask._worker.store.data_key`), so managed memory counts it
once. Registration goes the way ``Client.scatter(..., direct=True)`` makes
futures of data a worker holds, through public Dask mechanisms only:

1. each rank's worker is asked, through Dask's own RPC (``client.rpc``, the
   worker handler ``twinkle_register``), to put the result into its data
   store if it is not there yet (results under 64 KiB are not until then)
   and to report its key and size;
2. the driver makes a ``Future(key, client)`` per key and then
   tells the scheduler, with its client id, that the worker holds it
   (``Scheduler.update_data(who_has=..., nbytes=..., client=client.id)``,
   the call scatter makes): the key is the client's from then on, the
   futures are finished (as scatter marks its own), and the scheduler frees the data on
   its worker once every future of it is released (Dask's
   ``client-releases-keys``).

The driver waits for those answers before :meth:`LazyResult.futures`
returns, so any graph that uses the futures reaches the scheduler after the
keys did. A failed rank's future is a task that raises the rank's error
(:func:`~twinkle_dask._worker.dask_data.rank_failed`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import html
import logging
import threading
import time
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import dask.threaded
from distributed import Future

from . import progress
from ._aio import check_not_on_loop, on_loop
from ._checks import check_timeout
from ._config import seconds
from ._wire.caller import Caller
from ._wire.channel import unpack
from ._wire.errors import add_note, decode_error
from ._wire.protocol import ErrorInfo, Fetch, Reply
from ._worker.dask_data import collect_lazy, collect_ranks, rank_failed
from ._worker.store import REGISTER_HANDLER, data_key
from .collect import MISSING, Collector, collect
from .exceptions import CallTimeoutError, NotInitializedError, SerializationError, WorkerLostError
from .lazy import LazySource, Meta
from .mesh import DeviceMesh

__all__ = ["LazyResult"]

logger = logging.getLogger(__name__)

BUILTIN_COLLECTS = frozenset({"none", "flatten", "mean", "avg", "sum", "first", "last_pp", "last_pp_first"})


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What one call was: who, where, and how its results are collected."""

    cid: str
    label: str
    group: str
    method: str
    call_id: int
    ranks: tuple[int, ...]
    addresses: tuple[str, ...]
    collect: Any
    collector: Collector
    mesh: DeviceMesh | None
    keep: bool
    timeout: float | None
    site: str | None

    def where(self, slot: int) -> str:
        return (
            f"raised by {self.label}.{self.method} on rank {self.ranks[slot]} of group "
            f"{self.group!r} ({self.addresses[slot]})"
        )


class Outcome:
    """One rank's answer to a call."""

    __slots__ = ("device", "error", "has_value", "info", "meta", "ok", "packed", "stop", "value")

    def __init__(self) -> None:
        self.ok = False
        self.device = False
        self.meta: Meta | None = None
        self.packed: Any = None
        self.has_value = False
        self.value: Any = None
        self.stop = False
        #: The worker's description of the error (``error``: one raised here, e.g. a lost worker).
        self.info: ErrorInfo | None = None
        self.error: BaseException | None = None

    @classmethod
    def from_reply(cls, reply: Reply) -> Outcome:
        out = cls()
        out.ok = reply.ok
        out.stop = reply.stop
        out.device = reply.device
        if out.ok:
            out.meta = Meta.from_wire(reply.meta)
            if reply.value is not None:
                out.packed = reply.value
                out.has_value = True
        else:
            out.info = reply.error
        return out

    @classmethod
    def lost(cls, exc: BaseException) -> Outcome:
        out = cls()
        out.error = exc
        return out

    def get(self) -> Any:
        if self.packed is not None:
            self.value = unpack(self.packed)
            self.packed = None
        return self.value


def _settle(ref: weakref.ref[LazyResult]) -> None:
    """End the wait for a failed call's lower ranks (weakly held: a dropped result is freed at once)."""
    result = ref()
    if result is not None and not result._done.done():
        result._done.set_result(None)


def _call_site_note(site: str | None) -> str:
    return f"called from {site}" if site else ""


def _dask_client() -> Any:
    """The ``distributed.Client`` of this process's session (a worker's own client inside components)."""
    from . import runtime

    session = runtime.process_session()
    client = getattr(session, "client", None)
    if client is not None and not getattr(session, "closed", False):
        return client
    try:
        from distributed import get_client

        return get_client()
    except ValueError:
        raise NotInitializedError(
            "handing a lazy result to Dask (or lazy.futures()) needs a Dask client: the driver's running "
            "session (twinkle_dask.initialize('dask', ...) first) or, in component code, the worker's "
            "(distributed.get_client() found none)"
        ) from None


def _key_name(info: CallInfo, suffix: str = "") -> str:
    """``<Component>.<method><suffix>-<token>``: Dask's dashboard groups the keys by what precedes the token."""
    from dask.base import tokenize

    return f"{info.label}.{info.method}{suffix}-{tokenize(info.cid, info.call_id)}"


def _first(results: list[Any]) -> Any:
    return results[0]


def _persisted(dsk: dict[Any, Any], *args: Any, rename: Any = None) -> Any:
    """A persisted lazy result: the Dask future of its collected value."""
    return next(iter(dsk.values()))


def _no_optimize(dsk: Any, keys: Any, **kwargs: Any) -> Any:
    return dsk


class _DaskLink:
    """A lazy result as Dask sees it: one future per rank (``futures()``), one for the collected value."""

    __slots__ = ("collected", "ranks")

    def __init__(self) -> None:
        #: Made by ``futures()``: the kept results registered under their data keys.
        self.ranks: tuple[Future[Any], ...] | None = None
        #: Made when the LazyResult itself is first used as a Dask future.
        self.collected: Future[Any] | None = None


class _ReleaseWhenDone:
    """Releases a kept result once the Dask task that collects it has run (it fetches the ranks' results)."""

    __slots__ = ("args", "caller")

    def __init__(self, caller: Caller, args: tuple[str, int, tuple[str, ...]]) -> None:
        self.caller, self.args = caller, args

    def __call__(self, _future: Any) -> None:
        if not self.caller.closed:
            self.caller.release(*self.args)


#: ``packing.args`` is set while this thread packs a component call's arguments (see call.invoke).
packing = threading.local()

#: Guards the creation of a lazy result's Dask futures (rare: only when a result is handed to Dask).
_link_lock = threading.Lock()


class LazyResult(Future[Any]):
    """The result of a remote call, collected when it is needed.

    Calling it (``r()``) waits for every rank, collects their results with
    the method's collect strategy and returns the value; the value is cached.
    ``r.result(timeout=...)``, ``r.done()`` and ``await r`` work too. Passed
    into another component's method, the data goes worker to worker.

    It is also a Dask future of the collected value: handed to
    ``client.submit``, ``client.map``, ``dask.delayed``, ``client.compute``,
    ``client.gather``, ``wait``, ``progress``, ``as_completed`` or
    ``futures_of``, its per-rank results become Dask data on their workers
    (:meth:`futures`) and one Dask task, placed by the scheduler, collects
    them; the values move worker to worker, never through the driver. None
    of that happens unless the result is handed to Dask.

    In an async driver (an asynchronous client, on its loop) ``await r`` is
    the way to the value: waiting there (``r()``, ``r.result()``,
    ``r.per_rank()``) raises :class:`~twinkle_dask.exceptions.BlockingCallError`
    until the value was awaited.

    Not constructed by users: remote method calls return it.
    """

    # distributed.Future has no __slots__, so instances have __dict__ and __weakref__ already.
    __slots__ = (
        "_caller",
        "_dask",
        "_done",
        "_error",
        "_info",
        "_inputs",
        "_lock",
        "_notify",
        "_observed",
        "_outcomes",
        "_released",
        "_remaining",
        "_value",
        "_value_set",
    )

    # Set in _create (annotations only: the slots above hold the values).
    _caller: Caller
    _info: CallInfo
    _inputs: list[Any] | None
    _notify: Callable[[str], None] | None
    _outcomes: list[Outcome | None]
    _remaining: int
    _done: concurrent.futures.Future[None]
    _value: Any
    _value_set: bool
    _error: BaseException | None
    _observed: bool
    _released: bool
    _lock: threading.Lock
    _dask: _DaskLink | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("LazyResult is returned by remote method calls; it cannot be built directly")

    @classmethod
    def _create(
        cls,
        caller: Caller,
        info: CallInfo,
        inputs: list[Any],
        notify: Callable[[str], None] | None,
    ) -> LazyResult:
        self = object.__new__(cls)
        self._caller = caller
        self._info = info
        self._inputs = inputs or None
        self._notify = notify
        self._outcomes = [None] * len(info.ranks)
        self._remaining = len(info.ranks)
        self._done = concurrent.futures.Future()
        self._value = None
        self._value_set = False
        self._error = None
        self._observed = False
        self._released = not info.keep
        self._lock = threading.Lock()
        self._dask = None
        return self

    # ------------------------------------------------------------------ loop side
    def _on_reply(self, slot: int, fut: asyncio.Future[Reply]) -> None:
        if fut.cancelled():
            outcome = Outcome.lost(WorkerLostError(self._info.addresses[slot], reason="call cancelled"))
        elif fut.exception() is not None:
            exc = fut.exception()
            if isinstance(exc, WorkerLostError):
                exc = WorkerLostError(
                    exc.address,
                    group=self._info.group,
                    rank=self._info.ranks[slot],
                    component=f"{self._info.label}.{self._info.method}",
                    reason=exc.reason,
                )
            outcome = Outcome.lost(exc)  # type: ignore[arg-type]
        else:
            outcome = Outcome.from_reply(fut.result())
        self._outcomes[slot] = outcome
        self._remaining -= 1
        if self._remaining == 0:
            self._inputs = None
            failed = [i for i, o in enumerate(self._outcomes) if o is not None and not o.ok]
            if failed and self._notify is not None:
                self._notify(self._failure_message(failed))
        if self._done.done():
            return
        if self._remaining == 0 or self._lowest_failure_known() or isinstance(outcome.error, WorkerLostError):
            # Settled: every rank answered, or the lowest failed rank is known (every rank below
            # it answered), or a worker was lost (the call can never finish: fail it at once).
            self._done.set_result(None)
        elif not outcome.ok:
            # A failed rank whose lower ranks still run: they could fail too, and the lowest
            # rank's error is the one raised. Wait for them, but not forever (they may be blocked
            # in a collective that the failed rank will never join).
            fut.get_loop().call_later(seconds("lowest-rank-wait"), _settle, weakref.ref(self))

    def _lowest_failure_known(self) -> bool:
        """Whether some rank failed and every rank below it has answered."""
        for outcome in self._outcomes:
            if outcome is None:
                return False
            if not outcome.ok:
                return True
        return False

    def _failure_message(self, failed: list[int]) -> str:
        first = self._outcomes[failed[0]]
        assert first is not None
        if first.error is not None:
            what = f"{type(first.error).__name__}: {first.error}"
        else:
            info = first.info
            what = f"{info.type_name}: {info.message}" if info is not None else "Exception"
        ranks = [self._info.ranks[i] for i in failed]
        site = f" (called from {self._info.site})" if self._info.site else ""
        return f"{self._info.label}.{self._info.method} failed on rank(s) {ranks}: {what}{site}"

    # ------------------------------------------------------------------ waiting
    def done(self) -> bool:
        """Whether the call has settled: every rank answered, or its failure is known.

        A failure is known once every rank below the lowest failed rank has
        answered (or ``twinkle-dask.lowest-rank-wait`` passed), or at once when
        a worker was lost.
        """
        return self._done.done()

    def _wait(self, timeout: float | None) -> None:
        timeout = self._info.timeout if timeout is None else timeout
        if self._done.done():
            return
        first = progress.threshold()
        try:
            if self._caller.in_worker:  # component code: the worker's executor runs nested calls meanwhile
                self._caller.block(self._done, timeout)
                return
            if timeout is not None and timeout <= first:
                self._done.result(timeout)
                return
            try:
                self._done.result(first)
                return
            except concurrent.futures.TimeoutError:
                pass
            remaining = None if timeout is None else timeout - first
            if not progress.enabled():
                self._done.result(remaining)
                return
            self._wait_with_bar(remaining)
        except concurrent.futures.TimeoutError:
            if any(o is not None and not o.ok for o in self._outcomes):
                return  # a rank failed while lower ranks still ran: its error, not a timeout
            pending = [self._info.ranks[i] for i, o in enumerate(self._outcomes) if o is None]
            raise CallTimeoutError(self._info.label, self._info.method, timeout or 0.0, pending) from None

    def _wait_with_bar(self, timeout: float | None) -> None:
        n = len(self._info.ranks)
        bar = progress.bar(n, f"{self._info.label}.{self._info.method}")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                if bar is not None:
                    bar.n = n - self._remaining
                    bar.refresh()
                step = 0.25 if deadline is None else max(0.0, min(0.25, deadline - time.monotonic()))
                try:
                    self._done.result(step)
                    return
                except concurrent.futures.TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise
        finally:
            if bar is not None:
                bar.close()

    def _raise_if_failed(self) -> None:
        if self._error is None:
            for slot, outcome in enumerate(self._outcomes):
                if outcome is None or outcome.ok:
                    continue
                if outcome.error is not None:
                    exc = add_note(outcome.error, self._info.where(slot))
                    if self._info.site:
                        add_note(exc, _call_site_note(self._info.site))
                else:
                    exc = decode_error(outcome.info, self._info.where(slot), _call_site_note(self._info.site))
                self._error = exc
                break
        if self._error is not None:
            self._observed = True
            raise self._error

    def _unfetched(self, slots: list[int]) -> list[int]:
        """The slots among ``slots`` whose value stayed on the worker."""
        return [slot for slot in slots if not self._outcomes[slot].has_value]  # type: ignore[union-attr]

    def _fetch_message(self) -> Fetch:
        return Fetch(self._info.cid, self._info.call_id)

    def _fetch_timeout(self, slot: int) -> CallTimeoutError:
        return CallTimeoutError(self._info.label, self._info.method, self._info.timeout or 0.0,
                                [self._info.ranks[slot]])

    def _fetch_lost(self, slot: int, exc: WorkerLostError) -> WorkerLostError:
        return WorkerLostError(exc.address, group=self._info.group, rank=self._info.ranks[slot],
                               component=f"{self._info.label}.{self._info.method}", reason=exc.reason)

    def _store_fetched(self, slot: int, reply: Reply) -> None:
        if not reply.ok:
            raise decode_error(reply.error, self._info.where(slot), _call_site_note(self._info.site))
        outcome = self._outcomes[slot]
        assert outcome is not None
        outcome.packed, outcome.has_value = reply.value, True

    def _fetch(self, slots: list[int], deadline: float | None) -> None:
        futures = {slot: self._caller.request_threadsafe(self._info.addresses[slot], self._fetch_message())
                   for slot in self._unfetched(slots)}
        for slot, fut in futures.items():
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                reply = fut.result(remaining)
            except concurrent.futures.TimeoutError:
                raise self._fetch_timeout(slot) from None
            except WorkerLostError as exc:
                raise self._fetch_lost(slot, exc) from None
            self._store_fetched(slot, reply)

    def _values(self, slots: list[int], timeout: float | None) -> list[Any]:
        timeout = self._info.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        self._wait(timeout)
        self._raise_if_failed()
        self._fetch(slots, deadline)
        return self._unpacked(slots)

    def _unpacked(self, slots: list[int]) -> list[Any]:
        values = []
        for slot in slots:
            outcome = self._outcomes[slot]
            assert outcome is not None
            try:
                values.append(outcome.get())
            except Exception as exc:
                raise SerializationError(
                    f"the result of {self._info.label}.{self._info.method} on rank {self._info.ranks[slot]} of "
                    f"group {self._info.group!r} cannot be deserialized in the driver: {type(exc).__name__}: "
                    f"{exc}. Return plain data (built-in types, numpy arrays, tensors) or objects of classes "
                    f"the driver can import."
                ) from exc
        return values

    def result(self, timeout: float | None = None) -> Any:
        """Wait for every rank, collect the results and return the value (cached).

        Parameters
        ----------
        timeout : float, optional
            Seconds to wait; defaults to the method's ``timeout``.

        Raises
        ------
        ConfigurationError
            If ``timeout`` is not None or a non-negative number.
        CallTimeoutError
            If some rank did not answer in time (they are named).
        BaseException
            The lowest failed rank's remote exception, with its original type
            and notes naming the component, method, rank and call site.
        WorkerLostError
            If a rank's worker died.
        SerializationError
            If a rank's result cannot be unpickled here.
        BlockingCallError
            If called on an async driver's event loop before the value was
            awaited (``await r`` there instead).
        """
        check_timeout(f"{self._info.label}.{self._info.method} result", timeout, allow_zero=True)
        if not self._value_set:
            check_not_on_loop(self._caller.loop, f"{self._info.label}.{self._info.method}(...).result()",
                              f"await {self._info.label}.{self._info.method}(...)")
        return self._value_locked(timeout)

    __call__ = result

    def _value_locked(self, timeout: float | None) -> Any:
        with self._lock:
            if self._value_set:
                return self._value
            needed = self._info.collector.needed(len(self._info.ranks), self._info.mesh)
            return self._collect_fetched(dict(zip(needed, self._values(needed, timeout))))

    def _collect_fetched(self, fetched: dict[int, Any]) -> Any:
        """Collect the fetched values (by slot) and cache the value; the caller holds the lock."""
        results = [fetched.get(i, MISSING) for i in range(len(self._info.ranks))]
        self._observed = True
        try:
            value = collect(self._info.collector, results, self._info.mesh)
        except Exception as exc:
            add_note(exc, f"while collecting {self._info.label}.{self._info.method} with "
                     f"collect={self._info.collector.name!r}")
            raise
        self._value, self._value_set = value, True
        return value

    def per_rank(self, timeout: float | None = None) -> list[Any]:
        """The uncollected per-rank results, in rank order.

        Raises
        ------
        BlockingCallError
            If called on an async driver's event loop (call it from a thread
            there: ``await asyncio.to_thread(r.per_rank)``).
        """
        check_timeout(f"{self._info.label}.{self._info.method} per_rank", timeout, allow_zero=True)
        check_not_on_loop(self._caller.loop, f"{self._info.label}.{self._info.method}(...).per_rank()",
                          "await asyncio.to_thread(result.per_rank)")
        values = self._values(list(range(len(self._info.ranks))), timeout)
        self._observed = True
        return values

    def __await__(self) -> Generator[Any, None, Any]:
        return self._await().__await__()

    async def _await(self) -> Any:
        if self._value_set:
            return self._value
        if on_loop(self._caller.loop):
            return await self._await_on_loop()
        await asyncio.wrap_future(self._done)
        return await asyncio.get_running_loop().run_in_executor(None, self.result)

    async def _settled(self) -> None:
        """``_wait(None)`` without blocking the running loop: until the call settled or its timeout passed."""
        if self._done.done():
            return
        timeout = self._info.timeout
        try:  # shielded: a timeout must not cancel the call's own future
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._done)), timeout)
        except TimeoutError:
            if not any(o is not None and not o.ok for o in self._outcomes):
                pending = [self._info.ranks[i] for i, o in enumerate(self._outcomes) if o is None]
                raise CallTimeoutError(self._info.label, self._info.method, timeout or 0.0, pending) from None

    async def _await_on_loop(self) -> Any:
        """``result()`` for an async driver: on the loop that delivers the replies, never blocking it."""
        timeout = self._info.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        await self._settled()
        self._raise_if_failed()
        needed = self._info.collector.needed(len(self._info.ranks), self._info.mesh)
        requests = {slot: self._caller.request(self._info.addresses[slot], self._fetch_message())
                    for slot in self._unfetched(needed)}
        for slot, request in requests.items():
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                reply = await asyncio.wait_for(asyncio.shield(request), remaining)
            except TimeoutError:
                raise self._fetch_timeout(slot) from None
            except WorkerLostError as exc:
                raise self._fetch_lost(slot, exc) from None
            self._store_fetched(slot, reply)
        # A thread in result() holds the lock while it waits for this loop: never block on it here.
        while not self._lock.acquire(blocking=False):
            await asyncio.sleep(0.001)
        try:
            if self._value_set:
                return self._value
            return self._collect_fetched(dict(zip(needed, self._unpacked(needed))))
        finally:
            self._lock.release()

    # Twinkle's lazy results can be iterated and measured after collecting.
    def __iter__(self) -> Any:
        return iter(self.result())

    def __len__(self) -> int:
        return len(self.result())

    # ------------------------------------------------------------------ hand-off
    def _stopped(self) -> bool:
        """For iteration: whether any rank's iterator was exhausted."""
        return any(o is not None and o.stop for o in self._outcomes)

    def _local_value(self) -> tuple[bool, Any]:
        """The collected value if it can be had without fetching: (True, value).

        Not for results that held GPU tensors: passed on, those must land on
        the consumer's device, so the consumer fetches them from the producer.
        """
        if not self._done.done():
            return False, None
        outcomes = self._outcomes
        if any(o is None or not o.ok or o.device for o in outcomes):
            return False, None
        if self._value_set:
            return True, self._value
        n = len(self._info.ranks)
        needed = self._info.collector.needed(n, self._info.mesh)
        if not all(outcomes[i].has_value for i in needed):  # type: ignore[union-attr]
            return False, None
        try:
            return True, self._value_locked(None)
        except Exception:
            return False, None

    def _source(self) -> LazySource:
        info = self._info
        metas: tuple[Meta | None, ...] | None = None
        if self._done.done():
            metas = tuple(o.meta if o is not None and o.ok else None for o in self._outcomes)
        spec = info.collect
        collect_spec = spec if isinstance(spec, str) and spec in BUILTIN_COLLECTS else info.collector
        return LazySource(info.cid, info.call_id, info.addresses, collect_spec, info.mesh,
                          f"{info.label}.{info.method}", metas)

    # ------------------------------------------------------------------ Dask
    def futures(self) -> list[Future[Any]]:
        """One ``distributed.Future`` per rank, in rank order: each rank's result as Dask data on its worker.

        The first call waits for the call to finish (as :meth:`result`
        does) and registers the kept results with the Dask scheduler under
        the keys they already have in their workers' data stores: no copy,
        no task, managed memory counts each result once. Later calls return
        the same futures. They work with every Dask API
        (``client.submit(fn, f)``, ``client.gather``, ``wait``,
        ``dask.delayed``) and keep the data alive on their workers for as
        long as they are held, after this LazyResult is gone too; once
        both are gone, Dask frees the data. A failed rank's future raises
        its error.

        Returns
        -------
        list of distributed.Future

        Raises
        ------
        NotInitializedError
            Without a running session (no Dask client to register with).
        CallTimeoutError
            The call did not finish within its timeout.
        """
        link = self._dask_link()
        ranks = link.ranks
        if ranks is None:
            with self._lock:  # one registration (not _link_lock: it waits for the call)
                if link.ranks is None:
                    link.ranks = self._register()
                ranks = link.ranks
        return list(ranks)

    def _dask_link(self) -> _DaskLink:
        link = self._dask
        if link is not None:
            return link
        with _link_lock:
            if self._dask is None:
                self._dask = _DaskLink()
            return self._dask

    def _register(self) -> tuple[Future[Any], ...]:
        """The rank futures: each rank's kept result registered under its data key (see the module docstring)."""
        info = self._info
        if info.keep and self._released:
            raise RuntimeError(f"{info.label}.{info.method}: this result was already released")
        client = _dask_client()
        self._wait(None)

        async def ask(address: str) -> Any:
            return await getattr(client.rpc(address), REGISTER_HANDLER)(cid=info.cid, call_id=info.call_id)

        async def ask_all() -> list[Any]:
            return list(await asyncio.gather(*(ask(a) for a in info.addresses), return_exceptions=True))

        replies = client.sync(ask_all)
        futures: list[Future[Any] | None] = []
        who_has: dict[str, list[str]] = {}
        nbytes: dict[str, int] = {}
        failed: list[tuple[int, BaseException]] = []
        for slot, (address, reply) in enumerate(zip(info.addresses, replies)):
            if isinstance(reply, BaseException):
                failed.append((slot, reply))
                futures.append(None)  # a task that raises the rank's error, below
                continue
            key = reply["key"]
            # Made before the scheduler hears of the key: its "key-in-memory" answer then finds them.
            futures.append(Future(key, client))
            who_has[key] = [address]
            nbytes[key] = int(reply["nbytes"])
        if who_has:
            client.sync(client.scheduler.update_data, who_has=who_has, nbytes=nbytes, client=client.id)
            for future in futures:
                if future is not None and future._state is not None:
                    future._state.finish()  # in memory now, as Client.scatter marks the futures it makes
        for slot, exc in failed:
            error = self._rank_error(slot, exc)
            futures[slot] = client.submit(rank_failed, error, pure=False,
                                          key=data_key(info.cid, info.ranks[slot], info.call_id))
        return tuple(f for f in futures if f is not None)

    def _rank_error(self, slot: int, exc: BaseException) -> BaseException:
        """The error of rank ``slot``'s future: the call's own error where the rank failed."""
        outcome = self._outcomes[slot]
        if outcome is not None and not outcome.ok:
            if outcome.error is not None:
                return add_note(outcome.error, self._info.where(slot))
            return decode_error(outcome.info, self._info.where(slot))
        return exc

    def _collected(self) -> Future[Any]:
        """The collected value as a Dask future: one task, placed by the scheduler, applies the collect.

        Never waits: Dask asks for this while it builds a graph (with its
        client's locks held), so it cannot wait for the call or for the
        scheduler. With the rank futures made already (:meth:`futures`),
        the task reads them as its dependencies; without, it fetches the
        ranks' results itself, worker to worker (:func:`collect_lazy`), and
        this result stays kept until the task has run.
        """
        link = self._dask_link()
        collected = link.collected
        if collected is not None:
            return collected
        with _link_lock:
            if link.collected is None:
                info = self._info
                src = self._source()
                key = _key_name(info, ".collect")
                ranks = link.ranks
                if ranks is not None:
                    needed = src.needed()
                    link.collected = ranks[0].client.submit(collect_ranks, src, needed, *(ranks[i] for i in needed),
                                                            key=key, pure=False)
                else:
                    if info.keep and self._released:
                        raise RuntimeError(f"{info.label}.{info.method}: this result was already released")
                    link.collected = _dask_client().submit(collect_lazy, src, key=key, pure=False)
            return link.collected

    # A Dask future of the collected value: Dask reads these (registration happens on first use).
    @property
    def key(self) -> Any:  # type: ignore[override]  # an attribute of Future
        return self._collected().key

    @property
    def _state(self) -> Any:  # type: ignore[override]
        return self._collected()._state

    @property
    def client(self) -> Any:
        return self._collected().client

    @property
    def _client(self) -> Any:  # type: ignore[override]
        return self._collected().client

    def release(self) -> None:
        """Dask's name: let go of the collected value's Dask future (the results live while this object does)."""
        link = self._dask
        if link is not None:
            link.collected = None

    def __hash__(self) -> int:
        return object.__hash__(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    def __dask_tokenize__(self) -> tuple[str, str, int]:
        return ("LazyResult", self._info.cid, self._info.call_id)

    # And a Dask collection of that one key, so that dask.compute, dask.persist and client.persist
    # take it too (a graph holding the collected future, as a persisted collection's does).
    def __dask_graph__(self) -> dict[Any, Any]:
        collected = self._collected()
        return {collected.key: collected}

    def __dask_keys__(self) -> list[Any]:
        return [self.key]

    def __dask_layers__(self) -> tuple[Any, ...]:
        return (self.key,)

    def __dask_postcompute__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return _first, ()

    def __dask_postpersist__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return _persisted, ()

    __dask_optimize__ = staticmethod(_no_optimize)
    # What dask.compute uses without a distributed client (a lazy result always has one).
    __dask_scheduler__ = staticmethod(dask.threaded.get)

    def __copy__(self) -> LazyResult:
        return self  # a handle on one call's results: copies are the same handle

    def __deepcopy__(self, memo: dict[int, Any]) -> LazyResult:
        return self

    def __reduce__(self) -> Any:
        info = self._info
        if getattr(packing, "args", False):
            raise TypeError(
                f"a LazyResult ({info.label}.{info.method}) sits inside an object the argument walk does not "
                f"look into (only lists, tuples and dicts are); pass it directly or in a list, tuple or dict, "
                f"or pass lazy.futures() (per-rank Dask futures) or lazy.result() (the value) instead"
            )
        # Inside a Dask graph (dask.delayed): a reference to the collected value, as a Future pickles.
        return Future, (self.key,)

    # ------------------------------------------------------------------ lifetime
    def _release(self) -> None:
        if not self._released:
            self._released = True
            info = self._info
            args = (info.cid, info.call_id, info.addresses)
            link = self._dask
            collected = None if link is None else link.collected
            if collected is not None and link is not None and link.ranks is None and not collected.done():
                # Its task fetches the results from the ranks: release them once it has run.
                collected.add_done_callback(_ReleaseWhenDone(self._caller, args))
                return
            # Registered results stay with their Dask futures (the scheduler frees them); the rest go now.
            self._caller.release(*args)

    def __del__(self) -> None:
        try:
            if not self._observed and not self._caller.closed and self._done.done() and any(
                o is not None and not o.ok for o in self._outcomes
            ):
                logger.warning("%s.%s failed and its result was never collected",
                               self._info.label, self._info.method)
            self._release()
        except Exception:  # interpreter shutdown
            pass

    # ------------------------------------------------------------------ display
    def _status(self) -> str:
        if self._value_set:
            return "collected"
        if not self._done.done():
            return f"pending ({len(self._info.ranks) - self._remaining}/{len(self._info.ranks)} ranks done)"
        if any(o is not None and not o.ok for o in self._outcomes):
            return "failed"
        return "finished"

    def __repr__(self) -> str:
        info = self._info
        return (
            f"<LazyResult {info.label}.{info.method} ranks={list(info.ranks)} "
            f"collect={info.collector.name!r} {self._status()}>"
        )

    def _repr_html_(self) -> str:
        info = self._info
        rows = "".join(
            f"<tr><td>{r}</td><td>{html.escape(a)}</td><td>{html.escape(self._rank_status(i))}</td></tr>"
            for i, (r, a) in enumerate(zip(info.ranks, info.addresses))
        )
        return (
            f"<div><strong>LazyResult</strong> {html.escape(info.label)}.{html.escape(info.method)} "
            f"&middot; group <code>{html.escape(info.group)}</code> &middot; collect "
            f"<code>{html.escape(info.collector.name)}</code> &middot; {html.escape(self._status())}"
            f"<table><tr><th>rank</th><th>worker</th><th>state</th></tr>{rows}</table></div>"
        )

    def _rank_status(self, slot: int) -> str:
        o = self._outcomes[slot]
        if o is None:
            return "running"
        if not o.ok:
            return "failed"
        meta = o.meta
        if meta is None:
            return "done"
        size = f" len={meta.length}" if meta.length is not None else ""
        return f"done ({meta.kind}{size})"
