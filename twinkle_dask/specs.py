"""The metadata that ``@remote_class`` and ``@remote_function`` record.

Specs are frozen values checked when the decorator runs, so a typo in a
strategy name fails at import time, not on the cluster.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from .collect import Collector, get_collector
from .dispatch import Dispatcher, get_dispatcher
from .exceptions import ConfigurationError, ConfigurationTypeError
from .mesh import DeviceMesh, is_mesh

__all__ = [
    "SPEC_ATTR",
    "USE_DEFAULT",
    "ClassSpec",
    "MethodSpec",
    "class_spec",
    "method_spec",
    "prepare_init_arguments",
]

#: The attribute under which a decorated class or function carries its spec.
SPEC_ATTR = "__twinkle_spec__"

CLASS_EXECUTE = ("all", "first", "peer")
METHOD_EXECUTE = ("all", "first")


class _UseDefault:
    """Sentinel: "use the decorator's value" in ``.options(...)``."""

    _instance: _UseDefault | None = None

    def __new__(cls) -> _UseDefault:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "USE_DEFAULT"

    def __reduce__(self) -> str:
        return "USE_DEFAULT"


USE_DEFAULT: Any = _UseDefault()


def _check_choice(what: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigurationError(f"unknown {what} {value!r}; valid choices are {list(choices)}")


def _check_timeout(timeout: Any) -> None:
    if timeout is None:
        return
    message = f"timeout must be a positive number of seconds or None, got {timeout!r}"
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ConfigurationTypeError(message)
    if not timeout > 0:
        raise ConfigurationError(message)


def _mesh_param(cls: type[Any]) -> str | None:
    init = cls.__dict__.get("__init__", cls.__init__)
    init = getattr(init, "__wrapped__", init)
    try:
        params = inspect.signature(init).parameters.values()
    except (TypeError, ValueError):
        return None
    for p in params:
        ann = p.annotation
        if ann is inspect.Parameter.empty:
            continue
        if getattr(ann, "__name__", None) == "DeviceMesh" or "DeviceMesh" in str(ann):
            return p.name
    return None


@dataclass(frozen=True, slots=True)
class ClassSpec:
    """What ``@remote_class`` recorded about a class.

    ``mesh_param`` names the ``__init__`` parameter annotated ``DeviceMesh``
    (None if there is none); ``mesh_type`` is the mesh class that parameter
    expects when it is not :class:`DeviceMesh` (the dp=1 mesh of an
    ``execute='first'`` component is made of that class).
    """

    execute: str = "all"
    mesh_param: str | None = None
    max_restarts: int = 0
    mesh_type: Any = None

    def __post_init__(self) -> None:
        _check_choice("remote_class execute", self.execute, CLASS_EXECUTE)
        m = self.max_restarts
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ConfigurationError(f"max_restarts must be a non-negative int, got {m!r}")


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """What ``@remote_function`` recorded about a method, with strategies resolved."""

    name: str
    dispatch: Any = "slice"
    execute: str = "all"
    collect: Any = "none"
    sync: bool = False
    lazy_collect: bool | None = None
    timeout: float | None = None
    dispatcher: Dispatcher = field(init=False, repr=False, compare=False)
    collector: Collector = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_choice("remote_function execute", self.execute, METHOD_EXECUTE)
        if not isinstance(self.sync, bool):
            raise ConfigurationTypeError(f"sync must be True or False, got {self.sync!r}")
        if self.lazy_collect is not None and not isinstance(self.lazy_collect, bool):
            raise ConfigurationTypeError(f"lazy_collect must be True, False or None, got {self.lazy_collect!r}")
        _check_timeout(self.timeout)
        object.__setattr__(self, "dispatcher", get_dispatcher(self.dispatch))
        object.__setattr__(self, "collector", get_collector(self.collect))

    def with_options(self, **options: Any) -> MethodSpec:
        """A copy with the given options replaced (``USE_DEFAULT`` keeps the recorded one)."""
        unknown = set(options) - {"dispatch", "execute", "collect", "sync", "lazy_collect", "timeout"}
        if unknown:
            raise ConfigurationError(
                f"unknown option(s) {sorted(unknown)}; valid options are dispatch, execute, "
                f"collect, sync, lazy_collect and timeout"
            )
        changes = {k: v for k, v in options.items() if v is not USE_DEFAULT}
        return replace(self, **changes) if changes else self


def class_spec(cls: type) -> ClassSpec | None:
    """The spec recorded on ``cls`` (or a base class), if any."""
    spec = getattr(cls, SPEC_ATTR, None)
    return spec if isinstance(spec, ClassSpec) else None


def method_spec(fn: Callable[..., Any]) -> MethodSpec | None:
    """The spec recorded on a function, if any."""
    spec = getattr(fn, SPEC_ATTR, None)
    return spec if isinstance(spec, MethodSpec) else None


def mesh_param_of(cls: type) -> str | None:
    """The name of ``cls.__init__``'s parameter annotated ``DeviceMesh``, if any."""
    return _mesh_param(cls)


def prepare_init_arguments(
    cls: type, args: tuple[Any, ...], kwargs: dict[str, Any], default_mesh: DeviceMesh | None
) -> tuple[tuple[Any, ...], dict[str, Any], DeviceMesh | None]:
    """Apply Twinkle's mesh rules to constructor arguments.

    If ``__init__`` has a parameter annotated ``DeviceMesh`` and none was
    passed, ``default_mesh`` fills it; if it has none, DeviceMesh arguments
    are dropped. Returns the arguments and the component's mesh.
    """
    spec = getattr(cls, SPEC_ATTR, None)
    mesh_param = spec.mesh_param if isinstance(spec, ClassSpec) else mesh_param_of(cls)
    mesh = next((a for a in (*args, *kwargs.values()) if is_mesh(a)), None)
    if mesh_param:
        if mesh is None and default_mesh is not None:
            kwargs = {**kwargs, mesh_param: default_mesh}
            mesh = default_mesh
        return args, kwargs, mesh
    args = tuple(a for a in args if not is_mesh(a))
    kwargs = {k: v for k, v in kwargs.items() if not is_mesh(v)}
    return args, kwargs, mesh
