"""Carrying exceptions from a worker to the driver with their original type."""

from __future__ import annotations

import traceback
from typing import Any

from .channel import pack, unpack
from .exceptions import RemoteError

NOTE = "[twinkle_dask]"


def encode_error(exc: BaseException) -> dict[str, Any]:
    """Reply fields describing ``exc`` (raised in the current thread)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    fields: dict[str, Any] = {
        "tn": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "msg": str(exc),
        "tb": tb,
    }
    if isinstance(exc, Exception):
        try:
            fields["e"] = pack(exc.with_traceback(None), "exception")
        except Exception:
            pass
    return fields


def decode_error(fields: dict[str, Any], *notes: str) -> BaseException:
    """Rebuild the exception described by ``fields``, with ``notes`` attached.

    Falls back to :class:`RemoteError` when the original type cannot be
    rebuilt here (not importable, or not picklable).
    """
    exc: BaseException | None = None
    if fields.get("e") is not None:
        try:
            exc = unpack(fields["e"])
        except Exception:
            exc = None
    if not isinstance(exc, Exception):
        exc = RemoteError(fields.get("tn", "Exception"), fields.get("msg", ""), fields.get("tb", ""))
    for note in notes:
        if note:
            exc.add_note(f"{NOTE} {note}")
    tb = fields.get("tb")
    if tb:
        exc.add_note(f"{NOTE} remote traceback:\n{tb.rstrip()}")
    return exc


def add_note(exc: BaseException, note: str) -> BaseException:
    """Attach a twinkle_dask note to ``exc`` once."""
    text = f"{NOTE} {note}"
    if text not in (getattr(exc, "__notes__", None) or []):
        exc.add_note(text)
    return exc
