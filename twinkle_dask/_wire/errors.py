"""Carrying exceptions from a worker to the driver with their original type.

An exception travels pickled as a whole when it survives a pickle round trip
on the worker (cloudpickle, so classes defined in ``__main__`` or in a function
travel by value). Many exception classes do not: pickle rebuilds an exception
as ``cls(*exc.args)``, which fails when ``__init__`` takes other arguments than
it passes to ``super().__init__``. Those travel as their class, ``args`` and
``__dict__`` and are rebuilt with ``cls.__new__(cls)`` (what ``tblib`` and
``distributed`` do). ``BaseException`` subclasses (``KeyboardInterrupt``,
``SystemExit``, a user's ``Abort(BaseException)``) travel the same way. When
the driver cannot rebuild the type at all, it raises :class:`RemoteError`,
which says why and keeps the type name, message and remote traceback.
"""

from __future__ import annotations

import pickle
import traceback
from typing import Any

from ..exceptions import RemoteError
from .channel import pack, unpack
from .protocol import ErrorInfo

NOTE = "[twinkle_dask]"


def _picklable_state(exc: BaseException) -> dict[str, Any]:
    """The entries of ``exc.__dict__`` that pickle (an exception may hold a socket, a lock, ...)."""
    state = {}
    for key, value in getattr(exc, "__dict__", {}).items():
        try:
            pack(value)
        except Exception:
            continue
        state[key] = value
    return state


def encode_error(exc: BaseException) -> ErrorInfo:
    """Describe ``exc`` (raised in the current thread) for the wire."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    bare = exc.with_traceback(None)
    try:
        blob = pack(bare, "exception")
        if type(unpack(blob)) is type(exc):  # survives the round trip: send it whole
            return ErrorInfo(type_name, str(exc), tb, exception=blob)
    except Exception:
        pass
    try:
        state = pack((type(exc), exc.args, _picklable_state(exc)), "exception state")
    except Exception as err:  # the class itself cannot be pickled
        why = f"{type(exc).__name__} cannot be pickled on the worker ({type(err).__name__}: {err})"
        return ErrorInfo(type_name, str(exc), tb, why=why)
    return ErrorInfo(type_name, str(exc), tb, state=state)


def _rebuild(info: ErrorInfo) -> BaseException:
    """The exception described by ``info``; raises if it cannot be rebuilt here."""
    if info.exception is not None:
        exc = unpack(info.exception)
    elif info.state is not None:
        cls, args, state = unpack(info.state)
        exc = cls.__new__(cls)
        exc.args = args
        if hasattr(exc, "__dict__"):
            exc.__dict__.update(state)
    else:
        raise pickle.UnpicklingError(info.why or "the worker sent no pickled exception")
    if not isinstance(exc, BaseException):
        raise TypeError(f"the worker sent a {type(exc).__name__}, not an exception")
    if isinstance(exc, (SystemExit, StopIteration)) and exc.args:
        # Their __init__ derives an attribute from args; unpickling does not run it.
        field = "code" if isinstance(exc, SystemExit) else "value"
        setattr(exc, field, exc.args[0] if len(exc.args) == 1 else exc.args)
    return exc


def _why(err: BaseException) -> str:
    if isinstance(err, ModuleNotFoundError) and err.name:
        return f"module {err.name!r} is not importable here"
    if isinstance(err, pickle.UnpicklingError) and not isinstance(err.__cause__, BaseException):
        return str(err)
    return f"{type(err).__name__}: {err}"


def decode_error(info: ErrorInfo | None, *notes: str) -> BaseException:
    """Rebuild the exception described by ``info``, with ``notes`` attached.

    Falls back to :class:`RemoteError`, which says why, when the original
    type cannot be rebuilt here (not importable, or not picklable).
    """
    if info is None:
        info = ErrorInfo("Exception", "", "", why="the worker sent no description of the error")
    try:
        exc = _rebuild(info)
    except Exception as err:
        exc = RemoteError(info.type_name, info.message, info.traceback, reason=_why(err))
    for note in notes:
        if note:
            exc.add_note(f"{NOTE} {note}")
    tb = info.traceback
    if tb:
        exc.add_note(f"{NOTE} remote traceback:\n{tb.rstrip()}")
    return exc


def add_note(exc: BaseException, note: str) -> BaseException:
    """Attach a twinkle_dask note to ``exc`` once."""
    text = f"{NOTE} {note}"
    if text not in (getattr(exc, "__notes__", None) or []):
        exc.add_note(text)
    return exc
