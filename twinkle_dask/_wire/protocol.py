"""Every message between a caller and a worker's twinkle extension, one frozen dataclass each.

A caller (the driver, or a worker whose components call other components)
sends requests on a channel (:mod:`twinkle_dask._wire.channel`); the worker's
``twinkle_stream`` handler answers each with a :class:`Reply` and may send
notices (:class:`Output`, :class:`Metrics`) at any time. On the wire a batch is
a list of ``(request_id, message)`` pairs; request id 0 marks a message that
wants no reply (:class:`Release`, notices). The worker dispatches on the
message's type (``TwinkleWorker.handlers``, like ``distributed.Worker.handlers``).

Messages pickle as their class and a tuple of their fields (``__reduce__``),
which costs about what a dict of short keys did.

Payloads (:class:`~twinkle_dask._wire.serde.Blob`) are serialized where they
are made: arguments in the caller's thread, results in the component's
executor thread, never on an event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..identity import Identity
from .serde import Blob

__all__ = [
    "INLINE_ALL",
    "INLINE_BYTES",
    "INLINE_NONE",
    "INLINE_SMALL",
    "Build",
    "Call",
    "Close",
    "ErrorInfo",
    "Fetch",
    "FetchMeta",
    "FreePort",
    "Metrics",
    "Output",
    "Ping",
    "Release",
    "Reply",
    "Request",
    "Stats",
]

#: Results up to this many bytes (``dask.sizeof``) travel in the reply of a lazy call.
INLINE_BYTES = 64 * 1024
#: What a call's reply carries: no value, small values only (lazy calls), every value (eager calls).
INLINE_NONE, INLINE_SMALL, INLINE_ALL = 0, 1, 2


class _Message:
    """Pickles as ``(type, fields)``: no per-field names on the wire."""

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        names: tuple[str, ...] = type(self).__slots__  # the dataclass's fields
        return type(self), tuple(getattr(self, name) for name in names)


# ---------------------------------------------------------------------------- requests
@dataclass(frozen=True, slots=True)
class Build(_Message):
    """Build one rank of a component: run ``klass(*args, **kwargs)`` (in ``payload``) on the worker."""

    component: str
    payload: Blob
    identity: Identity
    label: str
    #: The arguments hold lazy results the worker fetches before ``__init__`` runs.
    lazy_inputs: bool
    #: Made by component code: runs before the worker's queued driver calls (see _worker.execution).
    nested: bool = False


@dataclass(frozen=True, slots=True)
class Call(_Message):
    """Run ``method`` of one component rank with the arguments in ``payload``."""

    component: str
    call_id: int
    method: str
    payload: Blob
    #: The worker keeps the result under ``call_id`` until released (lazy results, fetches).
    keep: bool
    #: INLINE_NONE, INLINE_SMALL or INLINE_ALL: which values come back in the reply.
    inline: int
    lazy_inputs: bool
    #: A dispatcher the worker applies to lazy inputs itself (``(dispatcher, n, mesh)``, packed).
    remote_dispatch: Blob | None = None
    #: This rank's slot in the dispatch (with ``remote_dispatch``).
    dispatch_slot: int = 0
    nested: bool = False


@dataclass(frozen=True, slots=True)
class Fetch(_Message):
    """Send a kept result (or the part at ``path``, rows ``range``) to the caller."""

    component: str
    call_id: int
    path: tuple[Any, ...] = ()
    range: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class FetchMeta(_Message):
    """Describe a kept result (:class:`~twinkle_dask.lazy.Meta` on the wire) without sending it."""

    component: str
    call_id: int


@dataclass(frozen=True, slots=True)
class Release(_Message):
    """Drop kept results (one-way)."""

    component: str
    call_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Close(_Message):
    """Drop a component rank; with ``wait`` seconds, answer once nothing of it runs or the wait passed."""

    component: str
    wait: float = 0.0


@dataclass(frozen=True, slots=True)
class Ping(_Message):
    """Liveness: answered by the worker's event loop, whatever its components are doing."""


@dataclass(frozen=True, slots=True)
class Stats(_Message):
    """Counters of the worker's twinkle extension (tests and benchmarks)."""


@dataclass(frozen=True, slots=True)
class FreePort(_Message):
    """A free TCP port on the worker's host (a component group's MASTER_PORT)."""


Request = Build | Call | Fetch | FetchMeta | Release | Close | Ping | Stats | FreePort


# ---------------------------------------------------------------------------- replies
@dataclass(frozen=True, slots=True)
class ErrorInfo(_Message):
    """An exception raised on a worker (see :mod:`twinkle_dask._wire.errors`)."""

    #: ``module.QualifiedName`` of its type.
    type_name: str
    message: str
    traceback: str
    #: The exception pickled whole, when it survives a round trip.
    exception: Blob | None = None
    #: ``(type, args, __dict__)`` pickled, when only that does.
    state: Blob | None = None
    #: Why neither could be pickled.
    why: str | None = None


@dataclass(frozen=True, slots=True)
class Reply(_Message):
    """The answer to one request."""

    ok: bool
    error: ErrorInfo | None = None
    #: The result (Call, Fetch), when it travels in the reply.
    value: Blob | None = None
    #: What the result is (Call, FetchMeta): ``Meta.to_wire()``.
    meta: Any = None
    #: The call ended an iteration (``__next__`` raised StopIteration).
    stop: bool = False
    #: The result held GPU tensors: consumers fetch it themselves, to land on their device.
    device: bool = False
    #: Close: a job of the component is still running.
    running: bool = False
    #: FreePort.
    port: int = 0
    #: Ping: component ranks on the worker.
    components: int = 0
    #: Stats.
    stats: dict[str, int] | None = None


# ---------------------------------------------------------------------------- notices
@dataclass(frozen=True, slots=True)
class Output(_Message):
    """Lines a component printed (shown by the caller that built it)."""

    who: str
    stream: str
    text: str


@dataclass(frozen=True, slots=True)
class Metrics(_Message):
    """Values a component reported (``twinkle_dask.report``)."""

    component: str
    rank: int
    time: float
    values: dict[str, Any]


Notice = Output | Metrics
