"""The current session: what ``initialize`` set up, as the rest of the package sees it.

There is one process-wide session (``local`` or ``dask``, set by
:func:`twinkle_dask.initialize`). Threads that run component code on a worker
see a worker context instead, through a context variable, so an in-process
test cluster and the driver can share a process.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from ._wire.caller import Caller
    from .mesh import DeviceMesh

__all__ = ["GroupPlacement", "LocalSession", "Session", "current", "set_process_session"]


@dataclass(frozen=True, slots=True)
class GroupPlacement:
    """Where a device group's workers are: one entry per worker, in rank order."""

    name: str
    device_type: str
    addresses: tuple[str, ...]
    hosts: tuple[str, ...]
    devices: tuple[tuple[int, ...], ...]
    gpus_per_worker: int = 1
    names: tuple[str, ...] = ()

    @property
    def is_gpu(self) -> bool:
        return self.device_type == "cuda"


class Session(Protocol):
    """What components need from the running session."""

    mode: str
    in_worker: bool
    seed: int
    full_determinism: bool
    global_mesh: DeviceMesh | None
    lazy_collect: bool
    notify: Callable[[str], None] | None

    @property
    def caller(self) -> Caller: ...

    @property
    def closed(self) -> bool: ...

    def builds_remotely(self, group: str) -> bool: ...

    def build(self, klass: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any: ...

    def placement(self, group: str) -> GroupPlacement: ...

    def session_info(self) -> dict[str, Any]: ...

    def track(self, ref: Any) -> None: ...


class LocalSession:
    """``mode='local'``: components are plain in-process objects."""

    mode = "local"
    in_worker = False
    closed = False
    notify = None

    def __init__(
        self,
        *,
        seed: int,
        full_determinism: bool,
        global_mesh: DeviceMesh | None,
        lazy_collect: bool,
        groups: list[Any],
    ) -> None:
        self.seed = seed
        self.full_determinism = full_determinism
        self.global_mesh = global_mesh
        self.lazy_collect = lazy_collect
        self.groups = groups

    def builds_remotely(self, group: str) -> bool:
        return False

    def build(self, klass: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        raise ConfigurationError("local mode builds components in-process")


_process_session: Any = None
_lock = threading.Lock()
_thread_context: contextvars.ContextVar[Any] = contextvars.ContextVar("twinkle_dask_context", default=None)


#: Finds the context of a Dask task thread on a worker that runs twinkle (set by the worker extension).
_task_context: Callable[[], Any] | None = None


def current() -> Any:
    """The session that applies to this thread (a worker context inside components and Dask tasks)."""
    ctx = _thread_context.get()
    if ctx is not None:
        return ctx
    if _task_context is not None:
        ctx = _task_context()
        if ctx is not None:
            return ctx
    return _process_session


def process_session() -> Any:
    """The session ``initialize`` set up in this process, if any."""
    return _process_session


def set_process_session(session: Any) -> None:
    global _process_session
    with _lock:
        _process_session = session


def enter_worker_context(context: Any) -> None:
    """Make ``context`` the session of this thread (component threads on workers)."""
    _thread_context.set(context)


def set_task_context(find: Callable[[], Any]) -> None:
    """Let Dask task threads of this process's workers find their worker's context (``find``: None outside one)."""
    global _task_context
    _task_context = find
