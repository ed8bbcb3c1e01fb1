"""What the bridge reads from twinkle-kit's decorators, checked before anything is patched.

twinkle-kit keeps the options of ``@remote_class`` and part of those of
``@remote_function`` (``lazy_collect``, ``timeout``) only inside its wrappers'
closures, and its construction path was restructured in 0.4.0. So the bridge
checks, at import, that the installed version is one it supports and that
the wrappers still have the shape it reads (the closure variable names and
the module functions it hooks); anything else is an
:class:`~twinkle_dask.exceptions.UnsupportedTwinkleError` naming the tested
versions, never a half-working port.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

from ..exceptions import UnsupportedTwinkleError

__all__ = ["SUPPORTED", "TESTED_VERSIONS", "Internals", "probe"]

#: twinkle-kit versions the bridge's tests run against (Twinkle-on-Ray equality included).
TESTED_VERSIONS = ("0.5.1",)
#: The release series whose decorator internals the bridge reads.
SUPPORTED = "0.5"

_HOOKED = ("initialize", "remote_class", "remote_function", "_get_device_mesh_param_name", "_mode", "_seed",
           "_full_determinism", "_lazy_collect", "_device_group", "_device_mesh", "check_unsafe", "framework_util")
_INIT_FREEVARS = {"_new_init_body", "cls"}
_BODY_FREEVARS = {"cls", "device_mesh_name", "execute", "init_method"}
_METHOD_FREEVARS = {"collect", "dispatch", "execute", "func", "lazy_collect", "sync", "timeout"}


@dataclass(frozen=True)
class Internals:
    """The code objects that identify twinkle-kit's wrappers."""

    infra: Any  #: ``twinkle.infra`` (its private state is read and set)
    version: str
    init_code: types.CodeType  #: ``new_init``, the ``__init__`` ``@remote_class`` installs
    decorator_code: types.CodeType  #: the class decorator that ``remote_class(...)`` returns
    method_code: types.CodeType  #: ``wrapper``, what ``@remote_function(...)`` returns
    device_mesh: Any  #: ``twinkle.DeviceMesh``


def _fail(version: str, what: str) -> UnsupportedTwinkleError:
    return UnsupportedTwinkleError(
        f"twinkle_dask.bridge supports twinkle-kit {SUPPORTED}.x (tested: {', '.join(TESTED_VERSIONS)}), "
        f"and the installed twinkle-kit {version} {what}. Install a tested version: "
        f"pip install 'twinkle-dask[twinkle]' (twinkle-kit=={TESTED_VERSIONS[-1]})"
    )


def closure_of(fn: Any) -> dict[str, Any]:
    """A function's closure as a dict of variable name to value."""
    cells = fn.__closure__ or ()
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, cells)}


def probe() -> Internals:
    """Import twinkle-kit and check that its decorators have the shape the bridge reads."""
    try:
        import twinkle.infra as infra
        from twinkle.utils import DeviceMesh
        from twinkle.version import __version__ as version
    except ImportError as exc:
        raise UnsupportedTwinkleError(
            f"twinkle_dask.bridge runs twinkle-kit's components, and twinkle-kit cannot be imported ({exc}); "
            f"install it with pip install 'twinkle-dask[twinkle]' (tested: twinkle-kit "
            f"{', '.join(TESTED_VERSIONS)})"
        ) from exc
    if version.split(".")[:2] != SUPPORTED.split("."):
        raise _fail(version, "is outside that series")
    missing = [name for name in _HOOKED if not hasattr(infra, name)]
    if missing:
        raise _fail(version, f"has no twinkle.infra.{', '.join(missing)}")

    class _Probe:
        def __init__(self) -> None:
            pass

        def method(self) -> None:
            pass

    decorator = infra.remote_class(execute="all")
    wrapper = infra.remote_function(dispatch="all")(_Probe.method)
    klass = decorator(_Probe)
    init = klass.__dict__["__init__"]
    shapes = (
        (init, _INIT_FREEVARS, "its remote_class __init__"),
        (closure_of(init).get("_new_init_body"), _BODY_FREEVARS, "its remote_class construction"),
        (wrapper, _METHOD_FREEVARS, "its remote_function wrapper"),
    )
    for fn, names, what in shapes:
        if not isinstance(fn, types.FunctionType) or not names <= set(fn.__code__.co_freevars):
            raise _fail(version, f"changed {what} (expected closure variables {sorted(names)})")
    if getattr(init, "__wrapped__", None) is None or getattr(wrapper, "__wrapped__", None) is None:
        raise _fail(version, "no longer keeps the undecorated functions (__wrapped__)")
    return Internals(infra, version, init.__code__, decorator.__code__, wrapper.__code__, DeviceMesh)
