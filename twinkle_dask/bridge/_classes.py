"""Twinkle-decorated classes as twinkle_dask components.

A class decorated with twinkle-kit's ``@remote_class`` has twinkle's
``new_init`` as its ``__init__`` (the undecorated one in its closure, with
the decorator's ``execute``), and each ``@remote_function`` method is
twinkle's ``wrapper`` (the undecorated function and the options in its
closure). :func:`convert` reads those and gives the class what
``twinkle_dask.remote_class`` / ``remote_function`` would have given it:

* a :class:`~twinkle_dask.specs.ClassSpec` (``execute``, the ``DeviceMesh``
  parameter, Twinkle's mesh class) and one
  :class:`~twinkle_dask.specs.MethodSpec` per remote method (``dispatch``,
  ``execute``, ``collect``, ``sync``, ``lazy_collect``, ``timeout``);
* a ``__new__`` that, in dask mode, turns ``Cls(..., remote_group='g')`` into
  a build in group ``g``'s workers and returns the handle;
* an ``__init__`` and methods that, in dask mode, do what Twinkle's do in a
  Ray actor (seeding from ``TWINKLE_SEED``, the worker environment, the mesh
  rules, then the undecorated code), and in any other mode call Twinkle's own
  wrappers unchanged.

Converting is done once per class and does not depend on the mode, so a
class converted in a process that later runs Twinkle's ``local`` or ``ray``
mode behaves exactly as twinkle-kit made it.

Classes decorated after the bridge is installed are found while twinkle's
decorator runs (:func:`decoration_hook`) and converted on their first
construction at the latest; classes decorated before are found by
:func:`convert_loaded`.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import types
import weakref
from typing import Any

from .. import runtime
from ..exceptions import BridgeError, ConfigurationError
from ..futures import LazyResult
from ..identity import get_rank, get_world_size
from ..specs import SPEC_ATTR, ClassSpec, MethodSpec
from ._probe import Internals, closure_of

__all__ = ["convert", "convert_loaded", "decoration_hook", "is_twinkle_class"]

_lock = threading.RLock()
_converted: weakref.WeakSet[type] = weakref.WeakSet()
_pending: weakref.WeakSet[type] = weakref.WeakSet()
_internals: Internals | None = None

#: Set on every function the bridge installs, so it is never converted twice.
_BRIDGED = "__twinkle_dask_bridged__"


def setup(internals: Internals) -> None:
    """Remember the probed twinkle-kit internals (once, at install)."""
    global _internals
    _internals = internals


def _twinkle() -> Internals:
    if _internals is None:  # pragma: no cover - install() always runs setup() first
        raise BridgeError("twinkle_dask.bridge is not installed; import twinkle_dask.bridge first")
    return _internals


def _dask_mode() -> bool:
    return bool(_twinkle().infra._mode == "dask")


def is_twinkle_class(cls: Any) -> bool:
    """Whether ``cls`` itself was decorated with twinkle-kit's ``@remote_class``."""
    init = cls.__dict__.get("__init__") if isinstance(cls, type) else None
    return isinstance(init, types.FunctionType) and init.__code__ is _twinkle().init_code


def _is_twinkle_method(fn: Any) -> bool:
    return isinstance(fn, types.FunctionType) and fn.__code__ is _twinkle().method_code


def ray_actor_local_rank() -> None:
    """LOCAL_RANK as Twinkle gives every Ray actor: 0 (each actor sees its own devices from index 0).

    twinkle_dask numbers a CPU group's ranks on a host 0, 1, ... as torchrun does;
    Twinkle's components read ``LOCAL_RANK`` (``Platform.is_local_master()``, the
    local device), so while their code runs on a worker it is 0, as on Ray.
    The identity of the next call (any component) sets it again.
    """
    if os.environ.get("WORKER_NAME") and os.environ.get("LOCAL_RANK") != "0":
        os.environ["LOCAL_RANK"] = "0"



# ----------------------------------------------------------------------------- finding classes
def decoration_hook(original: Any) -> Any:
    """Wrap ``twinkle.infra._get_device_mesh_param_name``, which twinkle's class decorator calls first.

    The decorator's frame holds the class; it is marked so that its first
    construction converts it (the decorator installs ``__init__`` only after
    this call returns).
    """

    @functools.wraps(original)
    def _get_device_mesh_param_name(init_method: Any) -> Any:
        frame = sys._getframe(1)
        if frame.f_code is _twinkle().decorator_code:
            cls = frame.f_locals.get("cls")
            if isinstance(cls, type):
                _mark(cls)
        return original(init_method)

    setattr(_get_device_mesh_param_name, _BRIDGED, True)
    return _get_device_mesh_param_name


def _mark(cls: type) -> None:
    with _lock:
        _pending.add(cls)
        if "__new__" not in cls.__dict__ or not getattr(cls.__dict__["__new__"], _BRIDGED, False):
            cls.__new__ = _first_construction  # type: ignore[assignment]


def _first_construction(klass: type, *args: Any, **kwargs: Any) -> Any:
    """The ``__new__`` of a class marked while decorated: convert, then construct as converted."""
    convert(klass)
    return klass.__new__(klass, *args, **kwargs)


setattr(_first_construction, _BRIDGED, True)


def convert_pending() -> None:
    """Convert the classes decorated since the last call."""
    with _lock:
        pending = list(_pending)
    for cls in pending:
        convert(cls)


def convert_loaded() -> int:
    """Convert every twinkle-decorated class reachable from a loaded module; returns how many."""
    found = 0
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for value in list(namespace.values()):
            # type(value), not isinstance: that would read __class__, which some module attributes warn on
            if issubclass(type(value), type) and is_twinkle_class(value) and value not in _converted:
                convert(value)
                found += 1
    convert_pending()
    return found


# ----------------------------------------------------------------------------- converting
def convert(klass: type) -> type:
    """Give ``klass`` and the twinkle-decorated classes it inherits from twinkle_dask's specs and hooks."""
    with _lock:
        for cls in reversed(klass.__mro__):
            if cls in _converted or cls is object:
                continue
            twinkle_methods = [n for n, v in vars(cls).items() if _is_twinkle_method(v)]
            if not is_twinkle_class(cls) and not twinkle_methods:
                continue
            for name in twinkle_methods:
                setattr(cls, name, _bridged_method(cls, name, vars(cls)[name]))
            if is_twinkle_class(cls):
                _convert_class(cls)
            _converted.add(cls)
            _pending.discard(cls)
    return klass


def _convert_class(cls: type) -> None:
    twinkle_init = cls.__dict__["__init__"]
    body = closure_of(closure_of(twinkle_init)["_new_init_body"])
    spec = ClassSpec(execute=body["execute"], mesh_param=body["device_mesh_name"] or None,
                     mesh_type=_twinkle().device_mesh)
    setattr(cls, SPEC_ATTR, spec)
    cls.__init__ = _bridged_init(cls, twinkle_init, body["init_method"], spec)  # type: ignore[misc]
    cls.__new__ = _bridged_new(cls)  # type: ignore[method-assign]


def _method_spec(cls: type, name: str, wrapper: Any) -> MethodSpec:
    options = closure_of(wrapper)
    try:
        return MethodSpec(name, options["dispatch"], options["execute"], options["collect"], options["sync"],
                          options["lazy_collect"], options["timeout"])
    except ConfigurationError as exc:
        raise BridgeError(
            f"{cls.__qualname__}.{name} is declared with twinkle options that twinkle_dask cannot run: {exc}"
        ) from exc


def _bridged_method(cls: type, name: str, wrapper: Any) -> Any:
    func = closure_of(wrapper)["func"]
    spec = _method_spec(cls, name, wrapper)

    @functools.wraps(func)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not _dask_mode():
            return wrapper(self, *args, **kwargs)
        _twinkle().infra.check_unsafe(*args, **kwargs)
        ray_actor_local_rank()
        if _has_lazy(args, kwargs):
            args, kwargs = _collect_here(self, spec, args, kwargs)
        return func(self, *args, **kwargs)

    # What Twinkle's wrapper carries, for code that reads it.
    for attr in ("_execute", "_collect", "_dispatch", "_lazy_collect", "_sync"):
        if hasattr(wrapper, attr):
            setattr(method, attr, getattr(wrapper, attr))
    setattr(method, SPEC_ATTR, spec)
    setattr(method, _BRIDGED, True)
    method.__twinkle_wrapper__ = wrapper  # type: ignore[attr-defined]
    return method


def _has_lazy(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return any(isinstance(v, LazyResult) for v in (*args, *kwargs.values()))


def _collect_here(self: Any, spec: MethodSpec, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Lazy results given to an in-process instance: collected, then this rank's share taken.

    As Twinkle's wrapper does for an instance without actors: the values are
    fetched and dispatched over the running code's world size, and this
    rank's part kept (the whole input outside a component).
    """
    args = tuple(v.result() if isinstance(v, LazyResult) else v for v in args)
    kwargs = {k: (v.result() if isinstance(v, LazyResult) else v) for k, v in kwargs.items()}
    n, rank = get_world_size(), get_rank()
    if n <= 1:
        return args, kwargs
    pairs = spec.dispatcher(n, args, kwargs, getattr(self, "device_mesh", None))
    return pairs[rank if 0 <= rank < n else n - 1]


def _plain_new(klass: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What ``klass.__new__`` would do without the bridge's hooks."""
    for base in klass.__mro__:
        new = base.__dict__.get("__new__")
        if new is None or getattr(new, _BRIDGED, False):
            continue
        new = new.__func__ if isinstance(new, staticmethod) else new
        if new is object.__new__:
            break
        return new(klass, *args, **kwargs)
    return object.__new__(klass)


def _bridged_new(cls: type) -> Any:
    def __new__(klass: type, *args: Any, **kwargs: Any) -> Any:
        group = kwargs.get("remote_group")
        if group is not None:
            if _dask_mode():
                session = runtime.current()
                if session is None or session.closed:
                    raise BridgeError(
                        f"{klass.__name__}(..., remote_group={group!r}): no twinkle_dask session is running; "
                        f"call twinkle.initialize(mode='dask', groups=[...]) before building components"
                    )
                if session.builds_remotely(group):
                    from ._build import build_remote

                    return build_remote(klass, args, kwargs, session)
            else:
                from ._infra import check_mode_for_remote_build

                check_mode_for_remote_build(klass, group)
        return _plain_new(klass, args, kwargs)

    __new__.__qualname__ = f"{cls.__qualname__}.__new__"
    setattr(__new__, _BRIDGED, True)
    return __new__


def _bridged_init(cls: type, twinkle_init: Any, init_method: Any, spec: ClassSpec) -> Any:
    @functools.wraps(init_method)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if not _dask_mode():
            twinkle_init(self, *args, **kwargs)
            return
        from ._build import init_in_process

        init_in_process(self, cls, init_method, spec, args, kwargs)

    setattr(__init__, _BRIDGED, True)
    __init__.__twinkle_wrapper__ = twinkle_init  # type: ignore[attr-defined]
    return __init__
