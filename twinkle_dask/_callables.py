"""Calling user strategy functions with or without the device mesh.

Twinkle passes the mesh to custom dispatch and collect functions as the
keyword ``device_mesh``; older code takes it positionally or not at all. The
convention is read once from the signature, when the strategy is resolved.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal

from .exceptions import ConfigurationError

Convention = Literal["keyword", "positional", "none"]


def mesh_convention(fn: Callable[..., Any], fixed: int, what: str, signature: str) -> Convention:
    """How to pass the mesh to ``fn`` after its ``fixed`` positional arguments."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return "positional"
    if any(p.name == "device_mesh" for p in params) or any(p.kind is p.VAR_KEYWORD for p in params):
        return "keyword"
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.VAR_POSITIONAL for p in params) or len(positional) > fixed:
        return "positional"
    if len(positional) == fixed:
        return "none"
    raise ConfigurationError(
        f"{what} {getattr(fn, '__qualname__', fn)!r} takes {len(positional)} positional "
        f"argument(s); it must accept {signature}"
    )


def call_with_mesh(fn: Callable[..., Any], convention: Convention, mesh: Any, *args: Any) -> Any:
    """Call ``fn(*args)`` passing ``mesh`` the way ``convention`` says."""
    if convention == "keyword":
        return fn(*args, device_mesh=mesh)
    if convention == "positional":
        return fn(*args, mesh)
    return fn(*args)
