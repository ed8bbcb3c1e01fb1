"""The worker side: hosting component ranks, running their calls, serving their results.

Every worker that runs twinkle components carries a :class:`TwinkleWorker`
extension, installed by the ``twinkle_dask.worker`` preload (``dask worker
--preload twinkle_dask.worker``) or by :class:`TwinklePlugin`. Each component
rank on the worker is a :class:`RankHost` (its instance, its identity, its
random streams, its kept results); the worker's one
:class:`~twinkle_dask._worker.execution.Executor` runs the ``__init__`` and methods of
all of them, one at a time, in the order the calls arrived, while the
worker's event loop keeps answering fetches of earlier results and resolving
the lazy inputs of later calls. Kept results are Dask data: they live in the
worker's data store (see :mod:`twinkle_dask._worker.store`), counted as its
managed memory and spilled to disk by Dask's memory manager.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import functools
import inspect
import logging
import os
import random
import socket
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from dask.context import thread_state as task_thread_state  # a task thread's key and start time (Dask's)
from dask.sizeof import sizeof
from distributed.comm.core import Comm
from distributed.core import Status
from distributed.threadpoolexecutor import thread_state as tpe_thread_state  # what secede()/rejoin() read
from distributed.worker import _worker_cvar  # what get_worker() reads: set on the executor thread too

from .. import identity as _identity
from .. import reporting, runtime
from .._config import seconds
from .._keys import DESIRE_HANDLER
from .._seed import set_determinism
from .._wire.caller import Caller
from .._wire.channel import STREAM_HANDLER, Blob, ServerEnd, can_move_device, can_take_socket, pack, unpack
from .._wire.errors import add_note, decode_error, encode_error
from .._wire.protocol import (
    INLINE_ALL,
    INLINE_BYTES,
    INLINE_SMALL,
    Build,
    Call,
    Close,
    ErrorInfo,
    Fetch,
    FetchMeta,
    FreePort,
    Metrics,
    Notice,
    Output,
    Ping,
    Release,
    Reply,
    Request,
    Stats,
)
from .._wire.serde import cuda_usable, moves_device_memory, set_cuda_landing, set_device_frames
from ..dashboard import CallRecorder
from ..exceptions import (
    ColocationError,
    ComponentClosedError,
    ConfigurationError,
    DaskFutureError,
    SerializationError,
)
from ..lazy import Meta
from .execution import Executor, Streams
from .resolve import Resolver, extract
from .store import REGISTER_HANDLER, DataStore, data_key

__all__ = ["RankHost", "TwinkleWorker"]

logger = logging.getLogger(__name__)

#: How long a fetch waits for a call that has not reached this worker yet.
ARRIVAL_TIMEOUT = 120.0

#: Kept results larger than this (``dask.sizeof``) are Dask data: managed memory, spilled under the memory
#: limit. Smaller ones, which travel with the reply anyway, stay out of Dask's state machine, so that a
#: call with a small result costs no more than before (registering one for a Dask future puts it there).
DATA_BYTES = INLINE_BYTES

#: Seconds between a release of results and the trim that gives their memory back (at most one per period).
TRIM_DELAY = 0.5


@sizeof.register_lazy("torch")  # type: ignore[untyped-decorator]  # dask.sizeof is not annotated
def _register_torch_sizeof() -> None:
    # dask.sizeof does not know torch tensors (it would say ~80 bytes): without this, large tensor
    # results would count as small and travel back with every reply.
    import torch

    @sizeof.register(torch.Tensor)  # type: ignore[untyped-decorator]
    def _sizeof_tensor(t: Any) -> int:
        return int(t.element_size() * t.nelement())


#: The random generator Dask's own sampling uses in processes that run components.
_DASK_RNG = random.Random()


def _isolate_dask_sampling() -> None:
    """Give Dask's sampling a generator of its own, so that it never advances a component rank's streams.

    ``dask.sizeof`` samples large lists and dicts with the global ``random``
    module, and Dask's comms size every message they write with it; the
    compression of large frames samples with ``random.randint``. Between and
    during a rank's jobs the global generator *is* that rank's stream (see
    :class:`~twinkle_dask._worker.execution.Streams`), so each Dask message the
    worker sent (a task finishing, a heartbeat) would shift the numbers the
    rank draws next.
    """
    import dask.sizeof
    import distributed.protocol.compression

    setattr(dask.sizeof, "random", _DASK_RNG)  # noqa: B010  (the module's global name, read at each call)
    setattr(distributed.protocol.compression, "randint", _DASK_RNG.randint)  # noqa: B010


class WorkerContext:
    """The session as component code on a worker sees it (calls collect eagerly)."""

    mode = "dask"
    in_worker = True
    lazy_collect = False
    notify = None
    closed = False

    def __init__(self, ext: TwinkleWorker, group: str) -> None:
        self._ext = ext
        self.group = group
        self.info: dict[str, Any] = {"groups": {}, "seed": 42, "full_determinism": False, "global_mesh": None}

    @property
    def caller(self) -> Caller:
        return self._ext.caller

    @property
    def seed(self) -> int:
        return int(self.info["seed"])

    @property
    def full_determinism(self) -> bool:
        return bool(self.info["full_determinism"])

    @property
    def global_mesh(self) -> Any:
        return self.info["global_mesh"]

    def builds_remotely(self, group: str) -> bool:
        return group != self.group

    def build(self, klass: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        from ..group import create_component  # building from inside a component: the driver's path

        return create_component(self, klass, args, kwargs)

    def placement(self, group: str) -> runtime.GroupPlacement:
        groups = self.info["groups"]
        if group not in groups:
            raise ConfigurationError(f"unknown remote_group {group!r}; known groups are {sorted(groups)}")
        return groups[group]

    def session_info(self) -> dict[str, Any]:
        return self.info

    def track(self, ref: Any, plan: Any = None) -> None:
        self._ext.children.append(ref)


class TaskContext(WorkerContext):
    """The session as a Dask task (or actor) on a worker sees it: a handle passed into the task calls its component.

    Calls go through the worker's caller and collect eagerly, as calls made by
    component code do; they are not nested (the task is not component code).
    """

    def __init__(self, ext: TwinkleWorker) -> None:
        super().__init__(ext, "")

    @property
    def info(self) -> dict[str, Any]:
        # The session's groups and seed, as the components on this worker were given them.
        for host in reversed(list(self._ext.hosts.values())):
            return host.context.info
        return self._info

    @info.setter
    def info(self, value: dict[str, Any]) -> None:
        self._info = value


def _set_worker(worker: Any) -> None:
    """Make the calling thread (the executor's) look like a task thread of ``worker`` to Dask code.

    ``distributed.get_worker()`` returns ``worker`` there (so ``get_client()``
    and ``worker_client()`` give its client), and ``secede()`` / ``rejoin()``
    find a thread pool of the thread's own (:class:`_OwnPool`).
    """
    _worker_cvar.set(worker)
    tpe_thread_state.executor = _OwnPool()
    task_thread_state.start_time = time.time()
    # Not a task key: the worker's state machine ignores a secede of a key it does not run, and the scheduler
    # gives the tasks submitted from here no parent task.
    task_thread_state.key = f"twinkle-component-thread-{worker.name}"


class _OwnPool:
    """What ``distributed.secede()`` and ``rejoin()`` find on the component thread: a pool of its own.

    Component code does not run in the worker's task thread pool, so it
    holds none of its slots: seceding frees nothing and rejoining waits for
    nothing, and while the thread waits (``client.gather``, ``future.result()``)
    the worker keeps running its tasks in every slot. With this stand-in both
    return at once, so code written for Dask tasks (``secede(); ...;
    rejoin()``, ``with worker_client() as c:``, ``get_client().submit(...).result()``)
    runs unchanged in a component method.
    """

    def __init__(self) -> None:
        self._threads = _NoThreads()
        self._rejoin_lock = threading.Lock()
        self._rejoin_list = _Granted()

    def _adjust_thread_count(self) -> None:
        pass

    def submit(self, fn: Callable[[], Any]) -> None:
        pass


class _NoThreads:
    def remove(self, thread: threading.Thread) -> None:
        pass


class _Granted(list[Any]):
    """``rejoin()``'s queue: every thread that asks to rejoin may go on at once."""

    def append(self, item: Any) -> None:
        item[1].set()


def _task_context() -> TaskContext | None:
    """The context of the calling thread if it is a Dask task thread of a worker running twinkle."""
    worker = _worker_cvar.get(None)
    if worker is None:
        return None
    ext = worker.extensions.get(TwinkleWorker.name)
    return ext.task_context if isinstance(ext, TwinkleWorker) else None


class Job:
    """One unit of work for the worker's executor: a component rank's construction, or one call."""

    __slots__ = ("args", "call_id", "end", "error", "keep", "kind", "kwargs", "method", "msg", "payload", "ready",
                 "rid", "started", "stopped")

    def __init__(self, msg: Build | Call, rid: int, end: ServerEnd) -> None:
        self.kind = "call" if isinstance(msg, Call) else "new"
        #: The request; dropped when the job ends (its arguments go with it).
        self.msg: Build | Call | None = msg
        self.rid = rid
        self.end = end
        self.method = msg.method if isinstance(msg, Call) else "__init__"
        self.call_id = msg.call_id if isinstance(msg, Call) else 0
        self.keep = msg.keep if isinstance(msg, Call) else False
        self.ready: threading.Event | None = None
        self.payload: Any = None
        self.args: Any = None
        self.kwargs: Any = None
        self.error: BaseException | None = None
        self.started = self.stopped = 0.0


class RankOutcome:
    """A finished call on this rank: its value (kept for fetches) or its error.

    A kept value larger than :data:`DATA_BYTES` goes to the worker's data
    store under ``key`` (``stored``); ``value`` holds it only until then, or
    where the store refused it. Smaller ones stay in ``value``.
    """

    __slots__ = ("error", "key", "meta", "name", "nbytes", "ok", "packed", "stop", "stored", "value")

    def __init__(self, ok: bool, value: Any = None, meta: Meta | None = None, packed: Any = None,
                 error: ErrorInfo | None = None, stop: bool = False, name: str = "") -> None:
        self.ok = ok
        self.name = name
        self.value = value
        self.meta = meta
        self.packed = packed
        self.error = error
        self.stop = stop
        self.key = ""
        self.stored = False
        #: ``dask.sizeof`` of the value (0 where not measured).
        self.nbytes = 0


class RankHost:
    """One component rank on this worker: its instance, identity, random streams and results."""

    def __init__(self, ext: TwinkleWorker, cid: str, label: str, ident: _identity.Identity, owner: ServerEnd) -> None:
        self.ext = ext
        self.cid = cid
        self.label = label
        self.identity = ident
        self.owner = owner
        self.loop = ext.loop
        self.context = WorkerContext(ext, ident.group)
        self.streams = Streams(42, False)
        self.instance: Any = None
        self.iterator: Any = None
        self.results: dict[int, RankOutcome] = {}
        self.waiters: dict[int, list[asyncio.Future[RankOutcome]]] = defaultdict(list)
        self.pending: set[int] = set()
        self.released_early: set[int] = set()
        #: Kept results whose keys the scheduler knows (see TwinkleWorker.register): Dask frees those.
        self.registered: set[int] = set()
        self.max_id = 0
        self.closed = False
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._partial: dict[str, str] = {}
        self._idle: list[asyncio.Future[None]] = []
        self._who = f"{label} rank {ident.rank}"

    # ------------------------------------------------------------------ loop side
    def submit(self, job: Job) -> None:
        msg = job.msg
        assert msg is not None
        if job.keep:
            k = job.call_id
            self.max_id = max(self.max_id, k)
            self.pending.add(k)
        if msg.lazy_inputs or (isinstance(msg, Call) and msg.remote_dispatch is not None):
            job.ready = threading.Event()
            self.loop.create_task(self._resolve(job))
        self.ext.executor.submit(self, job, nested=msg.nested)

    async def _resolve(self, job: Job) -> None:
        assert job.ready is not None
        _worker_cvar.set(self.ext.worker)  # this task's context: get_client() finds the worker's client
        try:
            resolver = self.ext.resolver()
            msg = job.msg
            assert msg is not None
            # Unpickled off the event loop (see TwinkleWorker.unpack): an import it triggers must not stall the loop.
            payload = await self.ext.unpack(msg.payload)
            if isinstance(msg, Build):
                klass, args, kwargs, info = payload
                args, kwargs = await resolver.materialize((args, kwargs))
                job.payload = (klass, args, kwargs, info)
            elif msg.remote_dispatch is not None:
                dispatcher, n, mesh = await self.ext.unpack(msg.remote_dispatch)
                args, kwargs = payload
                job.args, job.kwargs = await resolver.remote_dispatch(dispatcher, n, msg.dispatch_slot, mesh,
                                                                      args, kwargs)
            else:
                job.args, job.kwargs = await resolver.materialize(payload)
        except BaseException as exc:
            job.error = exc
        finally:
            job.ready.set()

    def _finished(self, job: Job, outcome: RankOutcome) -> None:
        self.ext.recorder.record(self.label, job.method, self.cid, job.call_id, self.identity.rank,
                                 job.started, job.stopped, outcome.ok)
        if job.keep:
            k = job.call_id
            self.pending.discard(k)
            if k in self.released_early:
                self.released_early.discard(k)
            elif not self.closed:
                self.results[k] = outcome
                if outcome.ok and outcome.nbytes > DATA_BYTES:
                    outcome.key = data_key(self.cid, self.identity.rank, k)
                    self.ext.store.put(outcome)
            for fut in self.waiters.pop(k, ()):
                if not fut.done():
                    fut.set_result(outcome)
        packed, outcome.packed = outcome.packed, None
        if not outcome.ok:
            reply = Reply(False, error=outcome.error)
        else:
            if packed is not None:
                self.ext.stats["inline_bytes"] += packed.nbytes
            # GPU tensors (``device``): consumers fetch them themselves, to land on their device.
            reply = Reply(True, value=packed, meta=outcome.meta.to_wire() if outcome.meta is not None else None,
                          stop=outcome.stop, device=packed is not None and packed.device)
        job.end.reply(job.rid, reply)

    def release(self, ids: tuple[int, ...]) -> None:
        store = self.ext.store
        for k in ids:
            outcome = self.results.pop(k, None)
            if outcome is None:
                if k in self.pending:
                    self.released_early.add(k)
            elif k in self.registered:
                self.registered.discard(k)  # the scheduler frees its key once its futures are gone
            else:
                store.free(outcome)

    def value(self, outcome: RankOutcome, k: int) -> Any:
        """The value of kept call ``k`` (read back from disk if Dask spilled it)."""
        try:
            return self.ext.store.get(outcome)
        except KeyError:
            raise LookupError(
                f"the result of call {k} on {self.label} rank {self.identity.rank} is no longer held: Dask "
                f"released its key {outcome.key!r} once all its futures were released"
            ) from None

    async def outcome(self, k: int) -> RankOutcome:
        """The outcome of kept call ``k``, waiting for it if it is still to come."""
        found = self.results.get(k)
        if found is not None:
            return found
        if self.closed:
            raise ComponentClosedError(f"{self.label} rank {self.identity.rank} was closed")
        if k in self.pending or k > self.max_id:
            fut: asyncio.Future[RankOutcome] = self.loop.create_future()
            self.waiters[k].append(fut)
            timeout = None if k in self.pending else ARRIVAL_TIMEOUT
            return await asyncio.wait_for(fut, timeout)
        raise LookupError(
            f"the result of call {k} on {self.label} rank {self.identity.rank} is no longer held: it "
            f"was collected or released; keep the LazyResult alive while it is being passed on"
        )

    def close(self) -> bool:
        """Close this rank; returns whether one of its jobs is running right now (it cannot be stopped)."""
        self.closed = True
        store = self.ext.store
        for k, outcome in self.results.items():
            if k not in self.registered:
                store.free(outcome)
        self.results.clear()
        self.registered.clear()
        for futs in self.waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(ComponentClosedError(f"{self.label} rank {self.identity.rank} was closed"))
        self.waiters.clear()
        executor = self.ext.executor
        executor.call_soon(self._drop)  # after the jobs already queued (they see ``closed``)
        return executor.is_running(self)

    def idle(self) -> asyncio.Future[None]:
        """A future (loop side) that is set when no job of this rank runs any more."""
        fut: asyncio.Future[None] = self.loop.create_future()
        if not self.ext.executor.is_running(self):
            fut.set_result(None)
        else:
            self._idle.append(fut)
        return fut

    def left(self) -> None:
        """Executor thread: the last running job of this rank ended."""
        if self._idle:
            try:
                self.loop.call_soon_threadsafe(self._set_idle)
            except RuntimeError:  # worker loop closed
                pass

    def _set_idle(self) -> None:
        waiting, self._idle = self._idle, []
        for fut in waiting:
            if not fut.done():
                fut.set_result(None)

    def _drop(self) -> None:
        # Executor thread: the instance goes with its last job.
        self.instance = self.iterator = None
        self.ext.executor.forget(self)
        if self._aloop is not None:
            self._aloop.close()
            self._aloop = None

    # ------------------------------------------------------------------ executor thread
    def run(self, job: Job) -> None:
        """Run one job; the executor has made this rank's identity and streams the process's."""
        if job.ready is not None:
            job.ready.wait()
        job.started = time.time()
        if self.closed:
            outcome = RankOutcome(False, error=encode_error(
                ComponentClosedError(f"{self.label} rank {self.identity.rank} was closed")))
        elif job.kind == "new":
            outcome = self._construct(job)
        else:
            outcome = self._call(job)
        job.stopped = time.time()
        self._flush_output()
        # The call's arguments go now, not when the next call arrives.
        job.payload = job.args = job.kwargs = job.error = job.msg = None
        try:
            self.loop.call_soon_threadsafe(self._finished, job, outcome)
        except RuntimeError:  # worker loop closed
            pass

    # -- what the component says (component thread)
    def output(self, stream: str, text: str) -> None:
        pending = self._partial.get(stream, "") + text
        complete, _, rest = pending.rpartition("\n")
        self._partial[stream] = rest
        if complete:
            self._notify(Output(self._who, stream, complete + "\n"))

    def _flush_output(self) -> None:
        for stream, rest in list(self._partial.items()):
            if rest:
                self._partial[stream] = ""
                self._notify(Output(self._who, stream, rest + "\n"))

    def metrics(self, values: dict[str, Any]) -> None:
        self._notify(Metrics(self.label, self.identity.rank, time.time(), values))

    def _notify(self, notice: Notice) -> None:
        try:
            self.loop.call_soon_threadsafe(self.owner.notify, notice)
        except RuntimeError:  # the worker's loop is closed
            pass

    def _construct(self, job: Job) -> RankOutcome:
        try:
            if job.error is not None:
                raise job.error
            assert job.msg is not None
            klass, args, kwargs, info = job.payload if job.payload is not None else unpack(job.msg.payload)
            self.context.info = info
            self.streams.seed, self.streams.full_determinism = self.context.seed, self.context.full_determinism
            set_determinism(self.context.full_determinism)
            # Built by the executor with this rank's streams installed: seeded, as a process of its own.
            self.streams.install()
            pg_before = _default_group_initialized()
            try:
                self.instance = klass(*args, **kwargs)
            except BaseException as exc:
                if pg_before and _second_init(exc):
                    raise ColocationError(self.label, self.identity.rank, self.identity.group,
                                          self.ext.process_group_owner) from exc
                raise
            if not pg_before and _default_group_initialized():
                ident = self.identity
                self.ext.process_group_owner = f"{self.label} (rank {ident.rank} of group {ident.group!r})"
            try:
                self.instance.remote_group = self.identity.group
            except AttributeError:
                pass
            return RankOutcome(True)
        except BaseException as exc:
            return RankOutcome(False, error=encode_error(exc))

    def _call(self, job: Job) -> RankOutcome:
        msg = job.msg
        assert isinstance(msg, Call)
        name = msg.method
        try:
            if job.error is not None:
                raise job.error
            if job.args is not None:
                args, kwargs = job.args, job.kwargs
            else:
                args, kwargs = unpack(msg.payload)
            if self.instance is None:
                raise ComponentClosedError(f"{self.label} rank {self.identity.rank} has no instance")
            if name == "__twinkle_next__":
                if self.iterator is None:
                    raise RuntimeError(f"{self.label}: iteration was not started on this rank")
                try:
                    value = next(self.iterator)
                except StopIteration:
                    return RankOutcome(True, meta=Meta("none"), stop=True)
            elif name == "__iter__":
                self.iterator = iter(self.instance)
                value = None
            elif name == "__len__":
                value = len(self.instance)
            else:
                value = getattr(self.instance, name)(*args, **kwargs)
                if inspect.isawaitable(value):
                    value = self._run_async(value)
            return self._ok(value, msg.inline, name, job.keep)
        except BaseException as exc:
            return RankOutcome(False, error=encode_error(exc))

    def _ok(self, value: Any, inline: int, name: str, keep: bool) -> RankOutcome:
        packed = None
        nbytes = _nbytes(value) if keep or inline == INLINE_SMALL else 0
        if inline == INLINE_ALL or (inline == INLINE_SMALL and nbytes <= INLINE_BYTES):
            try:
                packed = pack(value, result_name(self.label, name, self.identity.rank))
            except SerializationError:
                if inline == INLINE_ALL:
                    raise
        outcome = RankOutcome(True, value, Meta.of(value), packed, name=name)
        outcome.nbytes = nbytes
        return outcome

    def _run_async(self, awaitable: Any) -> Any:
        if self._aloop is None:
            self._aloop = asyncio.new_event_loop()
        return self._aloop.run_until_complete(awaitable)


def _default_group_initialized() -> bool:
    dist = sys.modules.get("torch.distributed")
    return dist is not None and bool(dist.is_available()) and bool(dist.is_initialized())


def _second_init(exc: BaseException) -> bool:
    """Whether ``exc`` is torch's refusal to initialize the default process group a second time."""
    return isinstance(exc, (RuntimeError, ValueError)) and "default process group twice" in str(exc)


def result_name(label: str, method: str, rank: int) -> str:
    """How serialization errors name a result: the same for inline replies and fetches."""
    return f"the result of {label}.{method} on rank {rank}"


def _nbytes(value: Any) -> int:
    """``dask.sizeof(value)``: what decides whether it travels with the reply and whether it is Dask data."""
    try:
        return int(sizeof(value))
    except RecursionError:  # nested too deep to measure: pickling it will say so
        return 0


def _malloc_trim() -> None:
    """``malloc_trim(0)``: return the free pages of every glibc heap to the system (no-op elsewhere)."""
    global _trim_fn
    if _trim_fn is None:
        try:
            _trim_fn = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _trim_fn = False
    if _trim_fn:
        _trim_fn(0)


_trim_fn: Any = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


class TwinkleWorker:
    """The twinkle extension of a Dask worker."""

    name = "twinkle"

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.loop: asyncio.AbstractEventLoop = worker.loop.asyncio_loop
        self.hosts: dict[str, RankHost] = {}
        #: The channels served here (closed with the worker).
        self.ends: set[ServerEnd] = set()
        self.children: list[Any] = []
        #: Counters for tests and benchmarks: results served to other processes.
        self.stats = {"fetches": 0, "fetch_bytes": 0, "calls": 0, "inline_bytes": 0, "dask_fetches": 0,
                      "dask_local": 0}
        #: Runs the component code of this worker, one job at a time (see twinkle_dask._worker.execution).
        self.executor = Executor(f"twinkle-executor-{worker.name}")
        #: Unpickles what arrives for the calls (lazy inputs, fetched results) off the event loop: the first
        #: ``import torch`` an unpickle triggers takes seconds, and the loop must keep answering meanwhile.
        self.unpickler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"twinkle-unpickle-{worker.name}")
        #: Where kept results live: the worker's Dask data store.
        self.store = DataStore(worker, self.loop)
        self._trim_handle: asyncio.TimerHandle | None = None
        #: Which component rank initialized torch.distributed's default process group in this process.
        self.process_group_owner: str | None = None
        self.caller = Caller(self.loop, worker.connection_args, in_worker=True, on_notice=self._on_notice)
        self.caller.block = self.executor.wait
        self.caller.nested = self.executor.on_thread
        #: ``LazyResult.futures()`` asks for a kept result's data key through Dask's RPC (``client.rpc``).
        worker.handlers[REGISTER_HANDLER] = self.register_for_client
        # Component code sees its worker as Dask task code does: get_worker(), get_client().
        self.executor.call_soon(functools.partial(_set_worker, worker))
        #: What a Dask task thread on this worker uses to call components (a handle passed into a task).
        self.task_context = TaskContext(self)
        runtime.set_task_context(_task_context)
        reporting.route_process_streams()
        _isolate_dask_sampling()
        self.recorder = CallRecorder(worker, self.loop)
        #: What answers each request, by its type (like ``distributed.Worker.handlers``).
        self.handlers: dict[type, Callable[[int, Any, ServerEnd], None]] = {
            Call: self._call,
            Build: self._build,
            Fetch: self._fetch,
            FetchMeta: self._fetch_meta,
            Release: self._release,
            Close: self._close_rank,
            Ping: self._ping,
            Stats: self._stats,
            FreePort: self._free_port,
        }
        worker.handlers[STREAM_HANDLER] = self.twinkle_stream
        worker.extensions[self.name] = self
        # Tensors that left a GPU land on this worker's GPU (device 0 of its CUDA_VISIBLE_DEVICES).
        set_cuda_landing(os.environ.get("TWINKLE_GPU") == "1")
        # On UCX, a GPU worker's CUDA tensors travel device to device (TCP/TLS/inproc: through host memory).
        set_device_frames(moves_device_memory(worker.address) and cuda_usable())

    @staticmethod
    def _on_notice(notice: Notice) -> None:
        # Output of a component that a component on this worker built: show it here.
        if isinstance(notice, Output):
            reporting.show_output(notice.who, notice.stream, notice.text)

    def resolver(self) -> Resolver:
        async def request(address: str, msg: Fetch | FetchMeta) -> Reply:
            return await self.caller.request(address, msg)

        return Resolver(self.worker.address, request, self._read_local, self.dask_value, self.unpack)

    async def unpack(self, packed: Any) -> Any:
        """``unpack(packed)`` in the unpickling thread, never on the event loop (plain values pass through)."""
        if not isinstance(packed, Blob):
            return packed
        return await self.loop.run_in_executor(self.unpickler, unpack, packed)

    async def dask_value(self, key: Any) -> Any:
        """The value of the Dask key ``key``: read in place when this worker holds it, else fetched from a peer.

        A Dask ``Future`` in a component method's arguments arrives as its
        key; the caller holds the future until the call has answered, so the
        key stays in the cluster until this fetch is done. The worker's own
        client (``distributed.get_client()``) makes a future of the key; the
        scheduler makes that client want it as soon as it knows the key (the
        graph that made it may still be on its way from the caller: see
        :mod:`twinkle_dask._keys`, no polling), and ``Client.gather`` fetches
        the value from the worker holding it, as a task's dependency is.

        Raises
        ------
        Exception
            The error of the future's task, with a note naming the key.
        DaskFutureError
            The future was cancelled or lost, or the scheduler did not learn
            of the key within ``twinkle-dask.future-arrival-timeout``.
        """
        worker = self.worker
        ts = worker.state.tasks.get(key)
        if ts is not None and ts.state == "memory" and key in worker.data:
            self.stats["dask_local"] += 1
            return worker.data[key]
        from distributed import Future, get_client
        from distributed.client import FutureCancelledError

        client = get_client()
        if client.status != "running":
            await client
        wait = seconds("future-arrival-timeout")
        future: Future[Any] = Future(key, client)  # before the scheduler's answer, so that it finds it
        try:
            try:
                known = await getattr(worker.scheduler, DESIRE_HANDLER)(key=key, client=client.id,
                                                                        seconds=wait)
            except Exception as exc:  # the plugin is not on the scheduler
                known = exc
            if known is not True and known is not False:
                raise DaskFutureError(
                    f"the Dask future {key!r} passed to a component method cannot be fetched: the scheduler has "
                    f"no {DESIRE_HANDLER!r} handler ({known!r}); install twinkle-dask where the scheduler runs"
                )
            if not known:
                raise DaskFutureError(
                    f"the Dask future {key!r} passed to a component method is unknown to the scheduler after "
                    f"{wait:g} s (twinkle-dask.future-arrival-timeout): it was released or made by another "
                    f"cluster's client; pass a future of this session's client and keep it until the call returns"
                )
            try:
                value = await client.gather(future, direct=True)
            except FutureCancelledError:  # the key was cancelled or lost
                raise DaskFutureError(
                    f"the Dask future {key!r} passed to a component method was cancelled before its value "
                    f"could be fetched (client.cancel, or its data was lost with its worker); submit it again"
                ) from None
            except DaskFutureError:
                raise
            except Exception as exc:  # the task's own error
                raise add_note(exc, f"raised by the Dask future {key!r} passed to a component method") from None
        finally:
            future.release()
        self.stats["dask_fetches"] += 1
        return value

    async def _read_local(self, cid: str, call_id: int, index: int, path: tuple[Any, ...], rng: Any) -> Any:
        host = self._host(cid)
        outcome = await host.outcome(call_id)
        if not outcome.ok:
            raise decode_error(outcome.error, f"input produced by {host.label} on rank {index}")
        return extract(host.value(outcome, call_id), path, rng)

    async def register(self, cid: str, call_id: int) -> str:
        """Hand the kept result of call ``call_id`` on this worker's rank of ``cid`` to Dask: its data key.

        Waits for the call if it has not finished yet. The caller then tells the
        scheduler that this worker holds the key (as ``Client.scatter`` does,
        ``scheduler.update_data(who_has={key: [address]}, nbytes=...)``, the
        size in :meth:`nbytes`) and makes ``distributed.Future`` s of it. From
        then on the key is the scheduler's to free, once every future of it is
        released; a twinkle release of the result drops only twinkle's record,
        so whoever holds the LazyResult should hold one of those futures too.

        Parameters
        ----------
        cid : str
            The component's id (``ComponentRef.cid``).
        call_id : int
            The call whose result is kept.

        Returns
        -------
        str
            The key, :func:`~twinkle_dask._worker.store.data_key` ``(cid, rank, call_id)``.

        Raises
        ------
        Exception
            The call's own error, when it failed.
        LookupError
            The result was released (or never kept).
        SerializationError
            The value could not go into the data store (larger than the spill target and not picklable).
        ComponentClosedError
            The component is not on this worker.
        """
        host = self._host(cid)
        outcome = await host.outcome(call_id)
        if not outcome.ok:
            raise decode_error(outcome.error, f"registering the result of {host.label} on rank {host.identity.rank}")
        if host.results.get(call_id) is not outcome:
            raise LookupError(f"the result of call {call_id} on {host.label} rank {host.identity.rank} was "
                              f"released before it could be registered")
        if outcome.stored:
            if outcome.key not in self.worker.data:  # registered before, and its futures all released since
                raise LookupError(f"the result of call {call_id} on {host.label} rank {host.identity.rank} is no "
                                  f"longer held: Dask released its key {outcome.key!r}")
        else:
            outcome.key = data_key(cid, host.identity.rank, call_id)
            self.store.put(outcome)  # a small result (or one still on its way there): Dask data from now on
        if not self.store.held(outcome):
            raise SerializationError(
                f"the result of {host.label}.{outcome.name} on rank {host.identity.rank} cannot be Dask data: it "
                f"is larger than the worker's spill target and could not be pickled; return a picklable value"
            )
        host.registered.add(call_id)
        return outcome.key

    async def register_for_client(self, cid: str, call_id: int) -> dict[str, Any]:
        """Dask RPC handler ``twinkle_register``: :meth:`register`, for a client that makes futures of the key.

        The client then tells the scheduler, with its own id, that this worker
        holds the key (``Scheduler.update_data``, as ``Client.scatter``
        does); this worker stops reporting the key itself.

        Returns
        -------
        dict
            ``{"key": key, "nbytes": size Dask counts for it}``.
        """
        key = await self.register(cid, call_id)
        await self.store.claim(key)
        return {"key": key, "nbytes": self.nbytes(key)}

    def nbytes(self, key: str) -> int:
        """The size Dask counts for data ``key`` of this worker (what ``scheduler.update_data`` wants)."""
        ts = self.worker.state.tasks.get(key)
        if ts is None or ts.nbytes is None:
            raise LookupError(f"worker {self.worker.address} holds no data under key {key!r}")
        return int(ts.nbytes)

    def _host(self, cid: str) -> RankHost:
        host = self.hosts.get(cid)
        if host is None:
            raise ComponentClosedError(
                f"component {cid} is not on worker {self.worker.address}: it was closed, or its worker "
                f"was restarted"
            )
        return host

    async def twinkle_stream(self, comm: Comm, take: bool = False, device: bool = False) -> Status:
        """Dask handler: serve a caller's channel on ``comm`` until the caller goes away.

        ``take``: the caller asks to run the connection's TCP socket itself
        (see :func:`twinkle_dask._wire.channel.can_take_socket`); ``device``: the
        caller can send and receive device memory on this comm (see
        :func:`twinkle_dask._wire.channel.can_move_device`). The answers go back
        on the comm before either end uses it.
        """
        if take or device:
            take = take and can_take_socket(comm)
            device = device and can_move_device(comm)
            await comm.write({"take": take, "device": device}, serializers=("pickle",), on_error="raise")
        end = ServerEnd(comm, take, device)
        self.ends.add(end)
        try:
            await end.serve(self._on_message)
        finally:
            self.ends.discard(end)
            self._on_channel_closed(end)
        return Status.dont_reply

    async def close(self) -> None:
        """Dask calls this when the worker closes: end every channel served here."""
        await asyncio.gather(*(end.close() for end in list(self.ends)), return_exceptions=True)
        self.unpickler.shutdown(wait=False)

    def _on_channel_closed(self, end: ServerEnd) -> None:
        # The caller that built these components went away (its process exited): free them.
        for cid in [c for c, h in self.hosts.items() if h.owner is end]:
            self._close(cid)

    def _on_message(self, i: int, msg: Request, end: ServerEnd) -> None:
        handler = self.handlers.get(type(msg))
        try:
            if handler is None:
                raise ValueError(f"unknown twinkle message {type(msg).__name__}")
            handler(i, msg, end)
        except Exception as exc:
            if i:
                end.reply(i, Reply(False, error=encode_error(exc)))
            else:
                logger.warning("twinkle: could not handle a %s message: %s", type(msg).__name__, exc)

    # ------------------------------------------------------------------ handlers (event loop)
    def _call(self, i: int, msg: Call, end: ServerEnd) -> None:
        self._host(msg.component).submit(Job(msg, i, end))
        self.stats["calls"] += 1

    def _build(self, i: int, msg: Build, end: ServerEnd) -> None:
        if msg.component in self.hosts:
            raise RuntimeError(f"component {msg.component} already exists on this worker")
        host = RankHost(self, msg.component, msg.label, msg.identity, end)
        self.hosts[msg.component] = host
        host.submit(Job(msg, i, end))

    def _fetch(self, i: int, msg: Fetch, end: ServerEnd) -> None:
        self.loop.create_task(self._serve_fetch(i, msg, end))

    def _fetch_meta(self, i: int, msg: FetchMeta, end: ServerEnd) -> None:
        self.loop.create_task(self._serve_meta(i, msg, end))

    def _release(self, i: int, msg: Release, end: ServerEnd) -> None:
        host = self.hosts.get(msg.component)
        if host is not None:
            host.release(msg.call_ids)
            self.trim_soon()

    def _close_rank(self, i: int, msg: Close, end: ServerEnd) -> None:
        self.loop.create_task(self._serve_close(i, msg, end))

    def _ping(self, i: int, msg: Ping, end: ServerEnd) -> None:
        end.reply(i, Reply(True, components=len(self.hosts)))

    def _stats(self, i: int, msg: Stats, end: ServerEnd) -> None:
        held = sum(len(h.results) for h in self.hosts.values())
        end.reply(i, Reply(True, stats=dict(self.stats, hosts=len(self.hosts), held=held)))

    def _free_port(self, i: int, msg: FreePort, end: ServerEnd) -> None:
        end.reply(i, Reply(True, port=_free_port()))

    async def _serve_fetch(self, i: int, msg: Fetch, end: ServerEnd) -> None:
        try:
            host = self._host(msg.component)
            outcome = await host.outcome(msg.call_id)
            if not outcome.ok:
                end.reply(i, Reply(False, error=outcome.error))
                return
            value = extract(host.value(outcome, msg.call_id), msg.path, msg.range)
            packed = pack(value, result_name(host.label, outcome.name, host.identity.rank))
            self.stats["fetches"] += 1
            self.stats["fetch_bytes"] += packed.nbytes
            end.reply(i, Reply(True, value=packed))
        except Exception as exc:
            end.reply(i, Reply(False, error=encode_error(exc)))

    async def _serve_meta(self, i: int, msg: FetchMeta, end: ServerEnd) -> None:
        try:
            outcome = await self._host(msg.component).outcome(msg.call_id)
            meta = outcome.meta.to_wire() if outcome.ok and outcome.meta is not None else None
            end.reply(i, Reply(outcome.ok, meta=meta, error=outcome.error))
        except Exception as exc:
            end.reply(i, Reply(False, error=encode_error(exc)))

    def trim_soon(self) -> None:
        """Give memory freed by released results back to the system, at most once per TRIM_DELAY.

        glibc keeps freed memory in its heaps; Dask's nanny makes it trim eagerly
        with MALLOC_TRIM_THRESHOLD_, which makes every large buffer a fresh
        mmap (see cluster._worker_env). One ``malloc_trim(0)`` after a burst of
        releases returns the same memory without that cost on every call.
        """
        if self._trim_handle is None:
            self._trim_handle = self.loop.call_later(TRIM_DELAY, self._trim)

    def _trim(self) -> None:
        self._trim_handle = None
        self.loop.run_in_executor(None, _malloc_trim)

    def _close(self, cid: str) -> bool:
        """Close a component rank; returns whether a job of it is still running (stuck or busy)."""
        host = self.hosts.pop(cid, None)
        return host.close() if host is not None else False

    async def _serve_close(self, i: int, msg: Close, end: ServerEnd) -> None:
        """Close a component rank; with ``wait`` seconds, wait that long for a running job of it to end.

        The reply's ``running`` says whether one is still running: code that
        cannot be stopped from outside its process, which only a restart of
        the worker frees.
        """
        host = self.hosts.get(msg.component)
        running = self._close(msg.component)
        if running and host is not None and msg.wait:
            idle = host.idle()
            try:
                await asyncio.wait_for(idle, float(msg.wait))
                running = False
            except TimeoutError:
                pass
        end.reply(i, Reply(True, running=running))
