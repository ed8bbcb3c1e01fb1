"""Async drivers: telling when code runs on the driver's event loop, and awaiting blocking work off it.

With an asynchronous client (``Client(asynchronous=True)``) the driver's
:class:`~twinkle_dask.caller.Caller` lives on the user's own running loop.
Calls then use the loop-side API directly and return awaitables; the rarer
operations that talk to the scheduler and wait on several workers
(initialize, building, restarting and closing components, shutdown) run
their synchronous code in a thread of the loop's default executor, where the
Dask client behaves synchronously and the loop stays free to deliver the
replies they wait for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

from .exceptions import BlockingCallError

__all__ = ["Pending", "check_not_on_loop", "offload", "on_loop", "running_loop"]

T = TypeVar("T")


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, or None."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def on_loop(loop: asyncio.AbstractEventLoop | None) -> bool:
    """Whether this thread is running ``loop`` now (code here must not wait for that loop)."""
    return loop is not None and running_loop() is loop


def check_not_on_loop(loop: asyncio.AbstractEventLoop | None, what: str, instead: str) -> None:
    """Raise :class:`BlockingCallError` if waiting here would block ``loop``, the one we wait for."""
    if on_loop(loop):
        raise BlockingCallError(what, instead)


async def offload(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run the blocking ``fn(*args, **kwargs)`` in a thread (context variables copied) and await it."""
    return await asyncio.to_thread(fn, *args, **kwargs)


class Pending(Generic[T]):
    """An async driver's operation under way: ``await`` it for its outcome.

    It starts at once (as ``client.submit`` does), whether or not it is
    awaited; awaiting it gives its value or raises its error.
    """

    __slots__ = ("_task", "_what")

    def __init__(self, what: str, work: Coroutine[Any, Any, T]) -> None:
        self._what = what
        self._task: asyncio.Task[T] = asyncio.ensure_future(work)

    def __await__(self) -> Generator[Any, None, T]:
        return self._task.__await__()

    def done(self) -> bool:
        """Whether the operation finished (successfully or not)."""
        return self._task.done()

    def __repr__(self) -> str:
        state = "done" if self._task.done() else "pending"
        return f"<{self._what} ({state}): await it>"
